#!/usr/bin/env bash
# The sampler defaults chosen on the validation split (docs/results.md, "How defaults are
# chosen"): one LDM trained with the last H training images held out, N samples per sampler
# setting, each scored by Inception FID, precision/recall and pixel statistics against the
# held-out images (scripts/inception_probe.py --ref=val). Inception runs at ~6 images/s here.
#
#   scripts/validation_sweep.sh WORKDIR [N] [H] -- "W ETA" ...
#   scripts/validation_sweep.sh runs/val 2000 2000 -- "0 1" "1 1" "2 1" "0 0"
#
# WORKDIR must hold vae/ and ldm/ trained with --config.data.holdout=H.
set -euo pipefail
workdir=$1 num=${2:-2000} holdout=${3:-2000}
shift 3; [ "${1:-}" = "--" ] && shift
for setting in "$@"; do
  read -r w eta <<< "$setting"
  out="$workdir/val/w${w}_eta${eta}.png"
  mkdir -p "$workdir/val"
  python -m ldm_jax.sample --workdir="$workdir" --stage=ldm --num="$num" --seed=7 \
    --autoguidance="$w" --eta="$eta" --out="$out" >&2
  python scripts/inception_probe.py --ref=val --holdout="$holdout" --num="$num" \
    --npz="${out%.png}.npz" | sed "s/^{/{\"w\": $w, \"eta\": $eta, /"
done
