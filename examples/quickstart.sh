#!/usr/bin/env bash
# The whole MixtureGrowth pipeline on the built-in digits data, in a few minutes on a CPU:
# train a small template-mixed net, train its sibling, fuse both into a 2x wider net,
# finetune it to a FLOPs budget, and print the accuracies and the training-FLOPs ledger.
# Usage: bash examples/quickstart.sh [OUT_DIR]   (default: runs/quickstart; rerun = fresh)
set -euo pipefail
out=${1:-runs/quickstart}
rm -rf "$out" && mkdir -p "$out"
common=(--data digits --batch-size 64 --quiet)

echo "== 1. train the small net (WRN-10-2 at half width) =="
mgrow train --arch wrn-10-2 --width 0.5 --epochs 6 "${common[@]}" -o "$out/small.safetensors"
echo "== 2. train its sibling: same shape, fresh templates, growth point 5/6 =="
mgrow train-sibling "$out/small.safetensors" --epochs 5 "${common[@]}" -o "$out/sibling.safetensors"
echo "== 3. fuse: 2x wider, off-diagonal tiles from the existing templates (no data pass) =="
mgrow fuse "$out/small.safetensors" "$out/sibling.safetensors" -o "$out/grown.safetensors"
mgrow eval "$out/grown.safetensors"
echo "== 4. finetune the grown net: growth FLOPs (sibling + this) = 0.45X of a 6-epoch wide run =="
mgrow finetune "$out/grown.safetensors" --budget 0.45 --reference-epochs 6 "${common[@]}" \
  -o "$out/final.safetensors"
echo "== 5. the training-FLOPs ledger =="
mgrow flops "$out/final.safetensors" --reference-epochs 6 | tail -n 9
