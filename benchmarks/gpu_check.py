"""One short GPU check: the CUDA tests, training speed (in memory and streamed), fuse time.

    python benchmarks/gpu_check.py               # one CUDA GPU; < 8 minutes on an H100
    python benchmarks/gpu_check.py --cpu-smoke   # the same code end to end on CPU, tiny sizes

On this workplace's GPU machine (nothing installed, no network), prepare here with
`bash benchmarks/gpu_prepare.sh` (wheels the machine's image lacks into .whl/, a slice of
real CIFAR-10 into .cifar/), then run `bash benchmarks/gpu_run.sh` there, carrying .whl
and .cifar; it writes its log to $OUT/gpu_check.log.

(a) `pytest -m cuda`: bf16 autocast + channels_last training, mixed logits = plain logits,
    interrupt + resume on the GPU, and no host sync per training step (tests/test_cuda.py).
(b) Training images/s of the plain and the template-mixed WRN-28-10 at batch 128, bf16
    autocast and channels_last, the engine's step (lr set, autocast forward, cross-entropy,
    zero_grad, backward, SGD step, the engine's on-device non-finite bookkeeping). Steps
    alternate between the two nets so machine noise hits both alike; after the warm-up
    steps, each timed step is bracketed by torch.cuda.synchronize; medians are reported.
    Real CIFAR-10 images (--cifar, default ../shared/data/cifar10) when found, else random
    ones (the speed does not depend on pixel values).
(c) Fuse of two WRN-28-5 members: the CLI's whole fuse (load both bundles, grow, write),
    and load + grow + the grown WRN-28-10 built on the GPU, ready to train; one forward
    there is checked against the CPU's (TF32 off for that check: both in float32).
(d) Streamed training: the template-mixed ResNet-50 (1000 classes) at batch 256, bf16
    autocast and channels_last, fed by mgrow's streamed loader (mgrow.data.batches on an
    image folder: --workers processes decode JPEGs and apply RandomResizedCrop(224) + flip,
    pinned uint8 batches copied to the GPU and normalised there). The folder is written
    first: CIFAR-10 photographs upscaled to ImageNet-like sizes (shorter side 160-400 px),
    20 batches' worth. Each step is timed in two parts, bracketed by
    torch.cuda.synchronize: waiting for the next batch (loader + copy + normalise) and the
    training step; reported: images/s and the share of step time spent waiting for data.
    The loader prefetches (workers x 4 batches), so that share can hide a slow loader on
    so short a run: the loader alone is also timed over another epoch in batches of 32,
    from its first batch on, and compared with the training steps' own images/s.
Exit status: that of the tests (non-zero if any failed), else 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mgrow from this checkout, installed or not (the GPU machine)

from mgrow.arch import build  # noqa: E402
from mgrow.bundle import load, save_model  # noqa: E402
from mgrow.engine import lr_at, param_groups  # noqa: E402
from mgrow.growth import fuse  # noqa: E402
from mgrow.phases import fuse_files  # noqa: E402
from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"  # --cifar
FULL = dict(arch="wrn-28-10", batch=128, warmup=10, steps=30, fuse_arch="wrn-28-5", repeats=3,
            stream=dict(width=1.0, size=224, batch=256, warmup=5, steps=15, sides=(160, 400)))
SMOKE = dict(arch="wrn-10-1", batch=8, warmup=1, steps=2, fuse_arch="wrn-10-1", repeats=1,
             stream=dict(width=0.125, size=32, batch=8, warmup=1, steps=3, sides=(32, 64)))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return n CIFAR-10 training images (normalised) and labels, and where they came from."""
    if (CIFAR / "train_1.npz").exists():
        with np.load(CIFAR / "train_1.npz") as f:  # CIFAR: set from --cifar in main
            x = torch.from_numpy(f["images"][:n]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(f["labels"][:n]).long()
        return (x - 0.47) / 0.25, y, "real CIFAR-10"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
            "random (no CIFAR-10 copy found)")


def run_tests(smoke: bool) -> int:
    """(a) Run the CUDA-marked tests; return pytest's exit status."""
    print("(a) pytest -m cuda" + (" (CPU smoke: they skip without CUDA)" if smoke else ""),
          flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-s",
                           "-p", "no:cacheprovider", "tests/test_cuda.py"], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [s for s in proc.stdout.splitlines() if s.strip()]
    for line in [s for s in lines if "synchronizing CUDA calls" in s] + lines[-12:]:
        print("    " + line)
    print(f"    exit status {proc.returncode}, {time.perf_counter() - t0:.0f} s")
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


def throughput(size: dict, dev: torch.device) -> None:
    """(b) Print the training images/s of the plain and the mixed net and their ratio."""
    amp = dev.type == "cuda"
    x, y, source = images(size["batch"])
    x = x.to(dev).contiguous(memory_format=torch.channels_last)  # (B, 3, 32, 32)
    y = y.to(dev)
    print(f"(b) {size['arch']} training step, batch {size['batch']}, "
          f"{'bf16 autocast' if amp else 'fp32 (no autocast on CPU)'}, channels_last, "
          f"{source} images", flush=True)
    nets = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for name, mixing in (("plain", None), ("mixed", MixingSpec())):
        model = build(ArchSpec(name=size["arch"]), mixing).to(dev)
        for m in model.modules():  # as the engine does: conv weights only
            if isinstance(m, torch.nn.Conv2d):
                m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
        nets[name] = (model.train(), opt, [])
    total = size["warmup"] + size["steps"]
    bad = torch.full((), total, device=dev)
    loss_sum = torch.zeros((), device=dev)

    def step(model, opt, i: int) -> None:  # the engine's step
        nonlocal bad, loss_sum
        for group in opt.param_groups:
            group["lr"] = lr_at(i, total, 0, 0.1)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bad = torch.minimum(bad, torch.where(torch.isfinite(loss.detach()), total, i))
        loss_sum += loss.detach().float()

    for i in range(total):
        for name, (model, opt, times) in nets.items():
            sync(dev)
            t0 = time.perf_counter()
            step(model, opt, i)
            sync(dev)
            if i >= size["warmup"]:
                times.append(time.perf_counter() - t0)
    if int(bad) < total:
        raise SystemExit(f"non-finite loss at step {int(bad)}")
    speed = {name: size["batch"] / statistics.median(t) for name, (_, _, t) in nets.items()}
    for name, (_, _, t) in nets.items():
        print(f"    {name:5s} {statistics.median(t) * 1000:8.1f} ms/step (median of {len(t)}), "
              f"{speed[name]:8.0f} images/s")
    print(f"    images/s mixed / plain: {speed['mixed'] / speed['plain']:.3f}")
    if dev.type == "cuda":
        print(f"    peak GPU memory, both nets resident: "
              f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    del nets
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def fuse_time(size: dict, dev: torch.device) -> None:
    """(c) Print the time to fuse two members, to disk and onto the device."""
    arch, mixing = ArchSpec(name=size["fuse_arch"]), MixingSpec()
    print(f"(c) fuse two {size['fuse_arch']} members, result on {dev}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for seed, name in ((1, "a"), (2, "b")):
            man = Manifest(arch=arch, mixing=mixing, lineage=Lineage(operation="init"))
            save_model(d / f"{name}.safetensors", man, build(arch, mixing, seed=seed))
        to_disk, to_dev = [], []
        for r in range(size["repeats"]):
            t0 = time.perf_counter()
            fuse_files(d / "a.safetensors", d / "b.safetensors", d / f"g{r}.safetensors")
            to_disk.append(time.perf_counter() - t0)
            sync(dev)
            t0 = time.perf_counter()
            grown = fuse([load(d / "a.safetensors"), load(d / "b.safetensors")])
            model = build(grown.manifest.arch, grown.manifest.mixing, meta=True)
            model = model.to_empty(device=dev)
            model.load_state_dict(grown.tensors, strict=True)
            sync(dev)
            to_dev.append(time.perf_counter() - t0)
        print(f"    grown: {grown.manifest.describe()}, "
              f"{sum(t.numel() for t in grown.tensors.values()) / 1e6:.1f}M elements")
        print(f"    load 2 bundles + grow + write: median {statistics.median(to_disk):.2f} s "
              f"of {size['repeats']}")
        print(f"    load 2 bundles + grow + model on {dev}: median "
              f"{statistics.median(to_dev):.2f} s of {size['repeats']}")
        x, _, _ = images(8)
        model.eval()
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                got = model(x.to(dev)).float().cpu()
                want = load(d / "g0.safetensors").model().eval()(x)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        err = float((got - want).abs().max() / want.abs().max())
        print(f"    logits on {dev} vs CPU from the written bundle (float32, no TF32): max "
              f"relative difference {err:.1e}")
        if not err < 1e-3:
            raise SystemExit("the grown net on the device disagrees with the written bundle")


def streamed(size: dict, dev: torch.device, workers: int) -> None:
    """(d) Print streamed ResNet-50 training images/s and the share of time waiting for data."""
    import importlib.util

    from mgrow.data import batches, load_data
    s = size["stream"]
    amp = dev.type == "cuda"
    count = (s["warmup"] + s["steps"]) * s["batch"]  # one epoch: exactly the steps timed
    print(f"(d) streamed resnet50 (mixed, width {s['width']:g}) training, batch {s['batch']}, "
          f"input {s['size']}, {'bf16 autocast' if amp else 'fp32'}, channels_last, "
          f"{workers} loader workers", flush=True)
    spec = importlib.util.spec_from_file_location("image_folder",
                                                  ROOT / "examples/image_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        folder = mod.make_image_folder(Path(d), count, 10, *s["sides"], cifar=CIFAR)
        data = load_data(f"imagefolder:{folder}", input_size=s["size"], workers=workers)
        print(f"    folder of {count} photographs written and listed in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        arch = ArchSpec(name="resnet50", width=s["width"], num_classes=1000,
                        input_size=s["size"])
        model = build(arch, MixingSpec()).to(dev).train()
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
        waits, steps = [], []
        it = batches(data, True, s["batch"], 0, 0, device=dev)
        for i in range(s["warmup"] + s["steps"]):
            sync(dev)
            t0 = time.perf_counter()
            x, y = next(it)  # (B, 3, S, S) normalised on the device
            x = x.contiguous(memory_format=torch.channels_last)
            sync(dev)
            t1 = time.perf_counter()
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(dev)
            if i >= s["warmup"]:
                waits.append(t1 - t0)
                steps.append(time.perf_counter() - t1)
        total = sum(waits) + sum(steps)
        print(f"    {s['batch'] * len(steps) / total:8.0f} images/s end to end; the training "
              f"steps alone {s['batch'] * len(steps) / sum(steps):8.0f} images/s ({len(steps)} "
              f"steps timed)")
        print(f"    share of step time waiting for data: {sum(waits) / total:.1%} (loader "
              f"median {statistics.median(waits) * 1000:.1f} ms, step "
              f"{statistics.median(steps) * 1000:.1f} ms)")
        if not torch.isfinite(loss.detach()):
            raise SystemExit("non-finite loss in the streamed run")
        # the loader alone over another epoch in batches of 32 (many more batches than
        # workers x prefetch, so steady state dominates), from its first batch on
        t0, n = None, 0
        for x, _ in batches(data, True, min(32, s["batch"]), 1, 0, device=dev):
            sync(dev)
            if t0 is None:
                t0 = time.perf_counter()
            else:
                n += len(x)
        alone = n / (time.perf_counter() - t0)
        print(f"    the loader alone: {alone:8.0f} images/s ({workers} workers); "
              f"loader / training steps: {alone / (s['batch'] * len(steps) / sum(steps)):.2f} "
              f"(below 1: data-bound)")


def main() -> None:
    global CIFAR
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run everything on CPU at tiny sizes (wrn-10-1, batch 8, 2 steps)")
    p.add_argument("--steps", type=int, help="timed steps per net in (b)")
    p.add_argument("--skip-tests", action="store_true", help="skip (a)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="loader processes in (d) [default: every CPU]")
    p.add_argument("--cifar", type=Path, default=CIFAR,
                   help="folder of CIFAR-10 npz files (train_*.npz, test.npz) [default: "
                        "../shared/data/cifar10]")
    a = p.parse_args()
    CIFAR = a.cifar.resolve()
    if not (CIFAR / "test.npz").exists():
        raise SystemExit(f"{CIFAR}: no CIFAR-10 npz files (give --cifar; (d) writes its "
                         f"photographs from them)")
    size = dict(SMOKE if a.cpu_smoke else FULL)
    if a.steps:
        size["steps"] = a.steps
    if a.cpu_smoke:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU smoke test")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU threads")
    t0 = time.perf_counter()
    status = 0 if a.skip_tests else run_tests(a.cpu_smoke)
    throughput(size, dev)
    fuse_time(size, dev)
    streamed(size, dev, a.workers)
    print(f"done in {time.perf_counter() - t0:.0f} s; tests "
          f"{'skipped' if a.skip_tests else 'passed' if status == 0 else 'FAILED'}")
    sys.exit(status)


if __name__ == "__main__":
    main()
