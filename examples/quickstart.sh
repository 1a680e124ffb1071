#!/usr/bin/env bash
# What growth buys, in minutes on 2 CPU cores (README gives the measured time): train a
# small template-mixed net, train its sibling, fuse both into a 2x wider net, finetune it
# to a FLOPs budget, and set it side by side with the small net it started from and with
# Large Match (the wide net trained from scratch for the same growth budget).
#
# Data: CIFAR-10 in the npz layout when it is found ($MGROW_CIFAR10, else ../shared/data/
# cifar10 next to the repository, as in CI): 4,000 class-balanced training images, all
# 10,000 test images, WRN-10-2 at half width grown to WRN-10-2, E = 8 epochs. Otherwise
# the built-in digits (WRN-10-2 at width 0.25 grown to 0.5, E = 30): the pipeline runs in
# under a minute, but digits is too easy for the comparison to mean much (every net gets
# all but a few of the 360 test images right).
# Usage: bash examples/quickstart.sh [OUT_DIR]   (default: runs/quickstart; rerun = fresh)
# $MGROW_QUICKSTART_SUBSET and $MGROW_QUICKSTART_EPOCHS change the CIFAR-10 path's 4,000
# images and E = 8 (the test suite runs the script on a tiny folder that way).
set -euo pipefail
out=${1:-runs/quickstart}
rm -rf "$out" && mkdir -p "$out"
cifar=${MGROW_CIFAR10:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cifar10}
if [ -f "$cifar/test.npz" ]; then
  data=(--data "npz:$cifar" --subset "${MGROW_QUICKSTART_SUBSET:-4000}")
  E=${MGROW_QUICKSTART_EPOCHS:-8}; width=0.5; wide=1
else
  echo "(no CIFAR-10 npz folder at $cifar: using the built-in digits; set MGROW_CIFAR10)"
  data=(--data digits); E=30; width=0.25; wide=0.5
fi
ep() { awk "BEGIN { print $1 * $E }"; }  # a share of the E-epoch full schedule
common=("${data[@]}" --batch-size 64 --quiet)

echo "== 1. train the small net (WRN-10-2 at width $width, $E epochs) =="
mgrow train --arch wrn-10-2 --width "$width" --epochs "$E" "${common[@]}" \
  -o "$out/small.safetensors"
echo "== 2. train its sibling: same shape, fresh templates, growth point 0.8 =="
mgrow train-sibling "$out/small.safetensors" --epochs "$(ep 0.8)" "${common[@]}" \
  -o "$out/sibling.safetensors"
echo "== 3. fuse: 2x wider, off-diagonal tiles from the existing templates (no data pass) =="
mgrow fuse "$out/small.safetensors" "$out/sibling.safetensors" -o "$out/grown.safetensors"
echo "== 4. finetune the grown net: growth FLOPs (sibling + this) = 0.45X =="
mgrow finetune "$out/grown.safetensors" --budget 0.45 --reference-epochs "$E" "${common[@]}" \
  -o "$out/final.safetensors"
echo "== 5. Large Match: the wide net (plain) from scratch for the same 0.45X =="
mgrow train --arch wrn-10-2 --width "$wide" --plain --epochs "$(ep 0.45)" "${common[@]}" \
  -o "$out/large-match.safetensors"
echo "== 6. what growth buys: test top-1 (X = one $E-epoch run of the wide net) =="
show() { printf '%-44s ' "$1"; mgrow eval "$out/$2.safetensors" | sed 's/.*: top-1/top-1/'; }
show "small net, where growth starts (0.25X)" small
show "grown, right after fuse (+ sibling 0.20X)" grown
show "grown + finetune (growth total 0.45X)" final
show "Large Match: wide from scratch (0.45X)" large-match
echo "== 7. the grown net's training-FLOPs ledger =="
mgrow flops "$out/final.safetensors" --reference-epochs "$E" | tail -n 9
