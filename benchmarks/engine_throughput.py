"""Training throughput of mgrow's engine against a minimal hand-written PyTorch loop.

    python benchmarks/engine_throughput.py [--arch wrn-16-2] [--steps 30] [--rounds 3]

Both train the same template-mixed network on the same real CIFAR-10 images with the
same batches (mgrow.data.batches: in-memory, crop + flip), SGD and channels_last; the
hand loop is forward, loss, zero_grad, backward, step and nothing else. Rounds alternate
(engine, loop, engine, loop ...) and the script prints the median images/s of each and
their ratio. Target (issue 4): engine / loop >= 0.97.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mgrow.arch import build
from mgrow.data import batches, load_data
from mgrow.engine import TrainConfig, param_groups, train
from mgrow.manifest import ArchSpec, MixingSpec

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def engine_speed(arch: ArchSpec, data, steps: int, batch: int) -> float:
    """Return the engine's training images/s over one epoch of `steps` steps."""
    model = build(arch, MixingSpec())
    records = []
    train(model, data, TrainConfig(epochs=1, batch_size=batch, eval_every_epoch=True,
                                   device="cpu"), progress=records.append)
    return records[-1]["images_per_s"]


def loop_speed(arch: ArchSpec, data, steps: int, batch: int) -> float:
    """Return the images/s of a minimal loop over the same batches."""
    model = build(arch, MixingSpec()).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    t0 = time.perf_counter()
    for x, y in batches(data, True, batch, 0, 0):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="wrn-16-2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    data = load_data(f"npz:{CIFAR}", subset=a.steps * a.batch)
    data.test_x, data.test_y = data.test_x[:a.batch], data.test_y[:a.batch]  # tiny eval
    arch = ArchSpec(name=a.arch)
    speeds = {"engine": [], "loop": []}
    for _ in range(a.rounds):
        speeds["engine"].append(engine_speed(arch, data, a.steps, a.batch))
        speeds["loop"].append(loop_speed(arch, data, a.steps, a.batch))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"{a.arch} mixed, batch {a.batch}, {a.steps} steps x {a.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads:")
    for k, v in med.items():
        print(f"  {k:6s} {v:8.1f} images/s")
    print(f"  ratio engine/loop: {med['engine'] / med['loop']:.3f}")


if __name__ == "__main__":
    main()
