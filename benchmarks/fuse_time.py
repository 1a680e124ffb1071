"""How long `fuse` takes, next to one training step of the grown network.

    python benchmarks/fuse_time.py [--arch wrn-28-5] [--batch 128] [--repeats 3]

Writes two template-mixed members to a temporary folder, then times the whole fuse
(load both bundles from disk, grow, write the grown bundle) as the CLI does it, and one
training step of the grown net on a real CIFAR-10 batch. Fuse reads no data.
Target (issue 3): fuse < 2 s for two WRN-28-5 members.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mgrow.arch import build
from mgrow.bundle import load, save_model
from mgrow.engine import param_groups
from mgrow.phases import fuse_files
from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec

from step_time import real_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="wrn-28-5")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    arch, mixing = ArchSpec(name=a.arch), MixingSpec()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for seed, name in ((1, "a"), (2, "b")):
            man = Manifest(arch=arch, mixing=mixing, lineage=Lineage(operation="init"))
            save_model(d / f"{name}.safetensors", man, build(arch, mixing, seed=seed))
        fuse_s = []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            fuse_files(d / "a.safetensors", d / "b.safetensors", d / f"g{r}.safetensors")
            fuse_s.append(time.perf_counter() - t0)
        grown = load(d / "g0.safetensors")
        model = grown.model().to(a.device).train()
    x, y = (t.to(a.device) for t in real_batch(a.batch))
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    steps = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if a.device != "cpu":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
    print(f"fuse two {a.arch} members -> {grown.manifest.describe()} "
          f"({sum(t.numel() for t in grown.tensors.values()) / 1e6:.1f}M tensors' elements)")
    print(f"  fuse (load 2 bundles + grow + write): median {statistics.median(fuse_s):.2f} s "
          f"of {a.repeats}")
    print(f"  one training step of the grown net, batch {a.batch} on {a.device}: median "
          f"{statistics.median(steps[1:]):.2f} s")
    print(f"  fuse / step: {statistics.median(fuse_s) / statistics.median(steps[1:]):.2f}")


if __name__ == "__main__":
    main()
