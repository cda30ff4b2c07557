#!/usr/bin/env bash
# The cpu-quick train steps of ldm_jax against the PyTorch peer (HF diffusers) at matched
# sizes and batch 64: reproduces the train-step rows of docs/results.md, "Cost".
#
#   PEER_PY=/work/peer-venv/bin/python scripts/vs_peer.sh WORKDIR [ROUNDS]   # WORKDIR/vae: any VAE
#
# The peer is ../shared/bench/peer_diffusers_cpu.py. The two run in turns, so a slow spell of
# the machine falls on both. ldm_jax runs on the CPU devices cli.setup_jax gives it (one per
# core) and, for the record, on one device (LDM_JAX_CPU_DEVICES=1). Each line is JSON: the
# median seconds of a step (ldm_jax: fresh parameters, benchmark.StepTimer).
set -euo pipefail
workdir=$1; rounds=${2:-3}
bench=$(cd "$(dirname "$0")/../../shared/bench" && pwd)
peer() {  # size channels blocks steps
  "$PEER_PY" -c "import sys, json, torch; sys.path.insert(0, '$bench'); torch.set_num_threads(2)
from peer_diffusers_cpu import bench
n, s, _ = bench($1, $2, $3, 64, $4, 1)
print(json.dumps(dict(stage='peer $1x$1x$2', params=n, median_s=s)))"
}
ours() {  # stage steps
  python -c "import json, os, numpy as np
from ldm_jax import benchmark, cli, configs
cli.setup_jax()
timer = benchmark.StepTimer(configs.get_config('$1', 'cpu-quick'), '$workdir')
t = timer.time($2)
print(json.dumps(dict(stage='$1', flags=os.environ.get('XLA_FLAGS', ''), median_s=float(np.median(t)),
                      compile_s=timer.compile_s, devices=timer.devices, n=$2)), flush=True)"
}
for _ in $(seq "$rounds"); do
  peer 8 4 "(32, 64)" 30
  ours ldm 30
  LDM_JAX_CPU_DEVICES=1 ours ldm 30
  peer 32 1 "(32, 64, 64)" 10
  ours pixel 10
  LDM_JAX_CPU_DEVICES=1 ours pixel 10
done
