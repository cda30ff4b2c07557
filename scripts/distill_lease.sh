#!/usr/bin/env bash
# One accelerator lease for few-step sampling (docs/results.md, "Few-step sampling") and the
# dtype and loop-rate rows of "Accelerators".
#
#   scripts/distill_lease.sh WORKDIR OUT
#
#   A. The README job's VAE and LDM: taken from WORKDIR/quick if it holds them (e.g. the CPU
#      run's checkpoints, carried), else trained here with the cpu-quick configs.
#   B. cpu-quick distillation of that LDM under each setting in VARIANTS (name:overrides),
#      checkpoints every 500 steps; every student scored at 1/2/4/8 steps and the teacher's
#      default sampler on the validation split and the test set (scripts/score_students.py),
#      and the first variant at each kept checkpoint (quality against distillation time).
#   C. The `full` train step in float32 and bfloat16 (scripts/dtype_bench.py) and the loop's
#      rate against its compiled step (scripts/loop_rate.py).
#   D. The pixel model (cpu-quick), its student, and their rows; a bfloat16 cpu-quick LDM
#      scored beside the float32 one.
#
# PRESET=smoke MAX_REF=50 runs the same path on a CPU.
set -uo pipefail
W=${1:?usage: scripts/distill_lease.sh WORKDIR OUT}
OUT=${2:?usage: scripts/distill_lease.sh WORKDIR OUT}
PRESET=${PRESET:-cpu-quick} NUM=${NUM:-2000} MAX_REF=${MAX_REF:-0}
DEADLINE=${DEADLINE:-520}  # seconds from the start by which everything has to be back in OUT
VARIANTS=${VARIANTS:-"ema095: ema0:--config.distill.target_ema=0.0"}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*"; }
quiet() { tr '\r' '\n' | grep --line-buffered -vE '\| *[0-9]+/[0-9]+ \['; return 0; }
left() { echo $((DEADLINE - (SECONDS - start))); }
run() {  # a command, stopped 5 s before the deadline
    local t=$(( $(left) - 5 ))
    [ "$t" -gt 5 ] || { say "no time left for: $*"; return; }
    say "$*"; timeout "$t" "$@" 2>&1 | quiet || say "failed ($?): $1 $2 $3"
}
score() { run python scripts/score_students.py --num="$NUM" --max_ref="$MAX_REF" --out="$OUT/students.jsonl" "$@"; }
say "device: $(python -c 'import jax; print(jax.devices()[0].device_kind)')"

q="$W/quick"
for s in vae ldm; do
    [ -d "$q/$s/checkpoints" ] && say "$s: carried" || run python -m ldm_jax.train --stage=$s --preset="$PRESET" --workdir="$q"
done

dirs=()
for v in $VARIANTS; do
    name=${v%%:*} args=${v#*:}
    d="$W/$name"; mkdir -p "$d"; cp -r "$q/vae" "$q/ldm" "$d/"
    run python -m ldm_jax.train --stage=distill --preset="$PRESET" --workdir="$d" \
        --config.train.ckpt_every=500 --config.train.keep_checkpoints=4 $args
    cp "$d/distill/metrics.jsonl" "$OUT/distill_$name.jsonl"
    dirs+=("$d")
done
score --workdirs="$(IFS=,; echo "${dirs[*]}")" --student=distill --save="$OUT/students.npz"
score --workdirs="${dirs[0]}" --student=distill --noteacher --steps=4 --student_steps=500,1000,1500

run python scripts/dtype_bench.py --workdir="$q" --preset=full --stages=ldm | tee "$OUT/dtype.jsonl"
run python scripts/loop_rate.py --root="$W/loop" --vae="$q/vae" --preset=full --steps=1000 \
    --log_every=100 --stages=ldm | tee "$OUT/loop_rate.jsonl"

for s in pixel distill_pixel; do run python -m ldm_jax.train --stage=$s --preset="$PRESET" --workdir="$q"; done
score --workdirs="$q" --student=distill_pixel --steps=1,4
b="$W/bf16"; mkdir -p "$b"; cp -r "$q/vae" "$b/"
run python -m ldm_jax.train --stage=ldm --preset="$PRESET" --workdir="$b" --config.model.dtype=bfloat16
run python scripts/choose_sampler.py --workdir="$b" --stages=ldm --settings=2:1 --num="$NUM" \
    --max_ref="$MAX_REF" --out="$OUT/bf16.jsonl"
run python scripts/choose_sampler.py --workdir="$q" --stages=ldm --settings=2:1 --num="$NUM" \
    --max_ref="$MAX_REF" --out="$OUT/bf16.jsonl"
say "done"
