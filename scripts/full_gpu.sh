#!/usr/bin/env bash
# The `full` preset on one accelerator: VAE, LDM and pixel baseline under equal wall-clock
# budgets, each scored by `evaluate --inception`: docs/results.md, "Accelerators" (lease 1).
#
#   scripts/full_gpu.sh WORKDIR OUT
#
# The stages train one after the other, each alone on the device; then `evaluate --inception`
# on NUM samples per model (DDIM-50), and the compiled train step of each U-Net
# (`benchmark --what=train`).
# Everything a reader needs comes back in OUT (at most 8 files): log.txt, train_logs.txt
# (each stage's metrics.jsonl), metrics.json, the two sample npz files, bench.jsonl and the
# reconstruction grid. Budgets, step counts and the deadline are environment variables;
# each stage's cosine schedule is sized (STEPS) to end near its minute budget (MIN).
# A stage whose STEPS is 0 is not trained (and so not evaluated); CKPT_EVERY sets how often
# each stage saves (a save stalls a fast device loop).
# PRESET=smoke NUM=128 runs the same path on a CPU in a few minutes.
set -uo pipefail
W=${1:?usage: scripts/full_gpu.sh WORKDIR OUT}
OUT=${2:?usage: scripts/full_gpu.sh WORKDIR OUT}
PRESET=${PRESET:-full}
VAE_STEPS=${VAE_STEPS:-3000} VAE_MIN=${VAE_MIN:-0.5}
LDM_STEPS=${LDM_STEPS:-8000} LDM_MIN=${LDM_MIN:-1.6}
PIXEL_STEPS=${PIXEL_STEPS:-4500} PIXEL_MIN=${PIXEL_MIN:-2.1}
NUM=${NUM:-10000}
CKPT_EVERY=${CKPT_EVERY:-1000}
DEADLINE=${DEADLINE:-560}  # seconds from the start by which everything has to be back in OUT
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
left() { echo $((DEADLINE - (SECONDS - start))); }
say() { echo "[$((SECONDS - start)) s] $*"; }

train() {  # stage steps minutes
    [ "$2" -gt 0 ] || { say "skip $1"; return; }
    say "train $1: $2 steps or $3 min"
    python -m ldm_jax.train --stage="$1" --preset="$PRESET" --workdir="$W" \
        --config.train.steps="$2" --config.train.max_minutes="$3" \
        --config.train.ckpt_every="$CKPT_EVERY" || say "train $1 failed: $?"
    { echo "# $1"; cat "$W/$1/metrics.jsonl"; } >> "$OUT/train_logs.txt" 2>/dev/null
}

say "device: $(python -c 'import jax; print(jax.devices()[0].device_kind)')"
train vae "$VAE_STEPS" "$VAE_MIN"
train ldm "$LDM_STEPS" "$LDM_MIN"
train pixel "$PIXEL_STEPS" "$PIXEL_MIN"

# Leave 50 s for the step benchmarks and the copies.
say "evaluate: $NUM samples per model, $(left) s left"
timeout $(( $(left) - 50 )) python -m ldm_jax.evaluate --workdir="$W" --preset="$PRESET" \
    --num="$NUM" --steps=50 --inception --nocost || say "evaluate stopped: $?"
for f in metrics.json ldm_samples.npz pixel_samples.npz reconstructions.png; do
    cp "$W/eval/$f" "$OUT/" 2>/dev/null || say "no $f"
done

for s in ldm pixel; do
    [ -d "$W/$s" ] || continue
    [ "$(left)" -gt 25 ] || { say "no time for the $s step benchmark"; continue; }
    timeout $(( $(left) - 5 )) python -m ldm_jax.benchmark --workdir="$W" --stage=$s \
        --what=train --preset="$PRESET" >> "$OUT/bench.jsonl" || say "benchmark $s stopped"
done
say "done"
