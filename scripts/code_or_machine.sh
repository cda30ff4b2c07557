#!/usr/bin/env bash
# Is a slower training run the code or the machine? Trains a cpu-quick STAGE (default vae) for STEPS steps
# with an old commit's code and with this checkout's, in the same venv, one after the other,
# and prints each one's final it/s (docs/results.md, "Reliability and its tests").
#   scripts/code_or_machine.sh 7be67a4 [STEPS] [STAGE] [FLAG...]   # FLAGs go to both runs
#   scripts/code_or_machine.sh 7be67a4 30 pixel --config.sample.guide_step=0 --config.sample.guide_weight=0
set -euo pipefail
commit=$1; steps=${2:-150}; stage=${3:-vae}; shift $(( $# < 3 ? $# : 3 ))
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d); trap 'git -C "$here" worktree remove --force "$tmp/old"; rm -rf "$tmp"' EXIT
git -C "$here" worktree add -q "$tmp/old" "$commit"
for tree in "$tmp/old" "$here"; do
  log="$tmp/$(basename "$tree").log"
  (cd "$tree" && PYTHONPATH="$tree" LDM_JAX_CACHE="$tmp/xla_$(basename "$tree")" \
    python -m ldm_jax.train --stage="$stage" --preset=cpu-quick --workdir="$tmp/w_$(basename "$tree")" \
    --config.train.steps="$steps" "$@" > "$log" 2>&1)
  echo "$(git -C "$tree" rev-parse --short HEAD): $(tr '\r' '\n' < "$log" | grep -o '[0-9.]*\(it/s\|s/it\)' | tail -1)"
done
