#!/usr/bin/env bash
# One accelerator lease for the Inception-FID tables: docs/results.md, "The README job's
# recipe, LDM against pixel" (part A) and "Accelerators" (part B, the 2026-12-04 rows).
#
#   scripts/inception_lease.sh WORKDIR OUT [NPZ]
#
# Each part chooses its sampling setting on the validation split:
#   A. The cpu-quick recipe (the README job's configs: same steps, batches and holdout) trained
#      on the device: VAE, LDM and pixel. Every W:ETA setting of both generators is scored on
#      the holdout and on the test set (scripts/choose_sampler.py), and so are the README
#      job's own CPU samples (NPZ), if given.
#   B. The `full` preset: VAE and LDM under minute budgets, with the same 2,000-image holdout
#      and an autoguide kept at step GUIDE; `evaluate --inception` at 10k (DDIM-50, eta 0, as
#      earlier leases measured), then the LDM's setting chosen on the holdout and drawn at 10k.
#
# At most 8 files come back in OUT: log.txt, quick.jsonl, quick_samples.npz, full_train.txt,
# metrics.json, full.jsonl, full_samples.npz. PRESET_A=smoke FULL=smoke runs the same path on a
# CPU (with MAX_REF=50: 50 reference images, so that Inception is quick there).
set -uo pipefail
W=${1:?usage: scripts/inception_lease.sh WORKDIR OUT [NPZ]}
OUT=${2:?usage: scripts/inception_lease.sh WORKDIR OUT [NPZ]}
NPZ=${3:-}
PRESET_A=${PRESET_A:-cpu-quick} FULL=${FULL:-full}
VAE_MIN=${VAE_MIN:-1.2} LDM_MIN=${LDM_MIN:-3.0} LDM_STEPS=${LDM_STEPS:-25000} GUIDE=${GUIDE:-2000}
NUM=${NUM:-2000} FINAL=${FINAL:-10000} MAX_REF=${MAX_REF:-0}
DEADLINE=${DEADLINE:-570}  # seconds from the start by which everything has to be back in OUT
SETTINGS_A=${SETTINGS_A:-0:0,0:1,1:1,2:1,3:1} SETTINGS_B=${SETTINGS_B:-0:0,0:1,1:0,1:1,2:1}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*"; }
quiet() { tr '\r' '\n' | grep --line-buffered -vE '\| *[0-9]+/[0-9]+ \['; return 0; }  # no progress bars
left() { echo $((DEADLINE - (SECONDS - start))); }
run() {  # a command, stopped 5 s before the deadline
    local t=$(( $(left) - 5 ))
    [ "$t" -gt 5 ] || { say "no time left for: $*"; return; }
    say "$*"; timeout "$t" "$@" 2>&1 | quiet || say "failed ($?): $1 $2 $3"
}
probe() { run python scripts/choose_sampler.py --num="$NUM" --max_ref="$MAX_REF" "$@"; }

say "device: $(python -c 'import jax; print(jax.devices()[0].device_kind)')"
q="$W/quick"
for s in vae ldm pixel; do
    run python -m ldm_jax.train --stage=$s --preset="$PRESET_A" --workdir="$q"
done
probe --workdir="$q" --stages=ldm,pixel --settings="$SETTINGS_A" \
    ${NPZ:+--npz=readme_job_cpu:$NPZ} --out="$OUT/quick.jsonl" --save="$OUT/quick_samples.npz"

f="$W/full"
common=(--preset="$FULL" --workdir="$f" --config.data.holdout=2000 --config.train.ckpt_every=5000)
run python -m ldm_jax.train --stage=vae "${common[@]}" --config.train.max_minutes="$VAE_MIN"
run python -m ldm_jax.train --stage=ldm "${common[@]}" --config.train.max_minutes="$LDM_MIN" \
    --config.train.steps="$LDM_STEPS" --config.sample.guide_step="$GUIDE"
for s in vae ldm; do { echo "# $s"; cat "$f/$s/metrics.jsonl"; } >> "$OUT/full_train.txt"; done
run python -m ldm_jax.evaluate --workdir="$f" --preset="$FULL" --num="$FINAL" --steps=50 \
    --inception --nocost
cp "$f/eval/metrics.json" "$OUT/" || say "no metrics.json"
probe --workdir="$f" --stages=ldm --settings="$SETTINGS_B" --final_num="$FINAL" \
    --out="$OUT/full.jsonl" --save="$OUT/full_samples.npz"
say "done"
