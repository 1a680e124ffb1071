"""Training-step time of a template-mixed network against the plain one, side by side.

    python benchmarks/step_time.py [--arch wrn-16-4] [--batch 128] [--steps 10]

Steps alternate between the two models (plain, mixed, plain, mixed ...) on the same real
CIFAR-10 batch, so machine noise hits both alike; the script prints the median of each and
their ratio. Target (issue 2): mixed / plain <= 1.03 for WRN-16-4 at batch 128 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mgrow.arch import build
from mgrow.engine import param_groups
from mgrow.manifest import ArchSpec, MixingSpec

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def real_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return n real CIFAR-10 training images (normalised) and labels."""
    with np.load(CIFAR / "train_1.npz") as f:
        x = torch.from_numpy(f["images"][:n]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(f["labels"][:n]).long()
    return (x - 0.47) / 0.25, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="wrn-16-4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args()
    x, y = real_batch(a.batch)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    runs = {}
    for name, mixing in (("plain", None), ("mixed", MixingSpec())):
        model = build(ArchSpec(name=a.arch), mixing).to(memory_format=fmt).train()
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
        runs[name] = (model, opt, [])

    def step(model, opt):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name, (model, opt, _) in runs.items():  # warm-up
        step(model, opt)
    for _ in range(a.steps):
        for name, (model, opt, times) in runs.items():
            t0 = time.perf_counter()
            step(model, opt)
            times.append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, (_, _, t) in runs.items()}
    print(f"{a.arch}, batch {a.batch}, {torch.get_num_threads()} threads, "
          f"median of {a.steps} interleaved steps:")
    for name in runs:
        print(f"  {name:5s} {med[name] * 1000:9.1f} ms/step")
    print(f"  ratio mixed/plain: {med['mixed'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
