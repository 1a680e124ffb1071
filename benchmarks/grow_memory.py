"""Peak memory of `mgrow fuse --method net2net` on builders' networks, against the bundles.

    python benchmarks/grow_memory.py [--only torchvision:resnet50,...] [--factor 2]

For each network: a plain bundle of the builder's network (fresh weights) is written to a
temporary folder, then `mgrow fuse IN --method net2net --noise 0 -o OUT` runs as its own
process, as a user runs it; its peak resident memory (the kernel's ru_maxrss) minus that of
a process that only imports mgrow and torch is set beside the input and output bundles'
sizes. Goal (issue 22, item 7): peak <= 1.5 x (input + output). Then `mgrow info OUT`
runs the same way: it loads and checks OUT and hashes its parent (reading only the
parent's manifest), so its peak is set beside the output's size alone. The default list ends with
the two largest torchvision classifiers (vit_h_14, regnet_y_128gf: about 630M weights,
2.5 GB, before growth; 10 GB after): they need about 20 GB free.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = ("torchvision:resnet50@32,torchvision:vit_b_16@32,torchvision:convnext_base@32,"
           "torchvision:vit_h_14@28,torchvision:regnet_y_128gf@32")
GOAL = 1.5


def peak_mb(args: list[str]) -> tuple[float, int, str]:
    """Run `args`; return its peak RSS in MB, its exit code and the last line it printed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    lines = out.strip().splitlines()
    return usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), lines[-1] if lines else ""


def write_bundle(name: str, size: int, path: Path) -> None:
    """Write a plain bundle of the builder's network, in a child (its memory is not ours)."""
    code = (
        "import sys, torch\n"
        "from mgrow.arch import build\n"
        "from mgrow.bundle import save_model\n"
        "from mgrow.manifest import ArchSpec, Lineage, Manifest\n"
        f"arch = ArchSpec(name={name!r}, num_classes=10, input_size={size})\n"
        "save_model(sys.argv[1], Manifest(arch=arch, lineage=Lineage(operation='init')),\n"
        "           build(arch, seed=0))\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=DEFAULT,
                   help="comma-separated NAME@INPUT_SIZE (default: %(default)s)")
    p.add_argument("--factor", type=int, default=2)
    a = p.parse_args()
    base, _, _ = peak_mb([sys.executable, "-c", "import torch, torchvision, mgrow.cli.main"])
    print(f"baseline (python + torch + mgrow imported): {base:.0f} MB; goal: peak above it "
          f"<= {GOAL} x (input + output)\n")
    print("| network | input MB | output MB | fuse peak MB (above baseline) | peak / (in + out) "
          "| goal met | info peak / out |")
    print("|---|---|---|---|---|---|---|")
    for item in a.only.split(","):
        name, _, size = item.partition("@")
        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "in.safetensors", Path(d) / "out.safetensors"
            write_bundle(name, int(size or 32), src)
            mb, code, last = peak_mb([sys.executable, "-m", "mgrow", "fuse", str(src),
                                      "--method", "net2net", "--noise", "0", "--factor",
                                      str(a.factor), "-o", str(dst)])
            if code != 0:
                print(f"| {name} | {src.stat().st_size / 2**20:.0f} | failed: {last} | | | | |")
                continue
            i, o = src.stat().st_size / 2**20, dst.stat().st_size / 2**20
            ratio = (mb - base) / (i + o)
            info, code, last = peak_mb([sys.executable, "-m", "mgrow", "info", str(dst)])
            shown = f"{(info - base) / o:.2f}" if code == 0 else f"failed: {last}"
            print(f"| {name} | {i:.0f} | {o:.0f} | {mb - base:.0f} | {ratio:.2f} | "
                  f"{'yes' if ratio <= GOAL else 'no'} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
