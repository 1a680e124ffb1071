#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_run.sh needs on the GPU machine, whose
# image has torch, torchvision, typer, rich, safetensors, Pillow and pytest but not
# pydantic or fvcore, and which reaches no network and no ../shared:
#   .whl/    wheels of the missing packages (CPython 3.12, x86-64; fvcore and iopath are
#            pure-Python sdists, built into wheels here)
#   .cifar/  a slice of real CIFAR-10 (5,200 training and 1,000 test images, npz)
# Both are git-ignored; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
rm -rf .whl .cifar
mkdir -p .whl .cifar
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions yacs==0.1.8 termcolor==3.3.0
$py -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10
$py - <<'PY'
import numpy as np
src, out = "../shared/data/cifar10", ".cifar"
with np.load(f"{src}/train_1.npz") as f:
    np.savez(f"{out}/train_1.npz", images=f["images"][:5200], labels=f["labels"][:5200])
with np.load(f"{src}/test.npz") as f:
    np.savez(f"{out}/test.npz", images=f["images"][:1000], labels=f["labels"][:1000])
PY
du -sh .whl .cifar
