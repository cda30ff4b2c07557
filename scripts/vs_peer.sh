#!/usr/bin/env bash
# Issue 15: the cpu-quick train steps of ldm_jax against the PyTorch peer (HF diffusers,
# ../shared/bench/peer_diffusers_cpu.py) at matched sizes and batch 64, in turns, so a slow
# spell of the machine falls on both. ldm_jax runs on the CPU devices cli.setup_jax gives it
# (one per core) and, for the record, on one device (LDM_JAX_CPU_DEVICES=1).
#
#   PEER_PY=/work/peer-venv/bin/python scripts/vs_peer.sh WORKDIR [ROUNDS]   # WORKDIR/vae: any VAE
set -euo pipefail
workdir=$1; rounds=${2:-3}
bench=$(cd "$(dirname "$0")/../../shared/bench" && pwd)
peer() {  # size channels blocks steps
  "$PEER_PY" -c "import sys, json, torch; sys.path.insert(0, '$bench'); torch.set_num_threads(2)
from peer_diffusers_cpu import bench
n, s, _ = bench($1, $2, $3, 64, $4, 1)
print(json.dumps(dict(stage='peer $1x$1x$2', params=n, median_s=s)))"
}
for _ in $(seq "$rounds"); do
  peer 8 4 "(32, 64)" 30
  python scripts/steptime.py ldm "$workdir" 30
  LDM_JAX_CPU_DEVICES=1 python scripts/steptime.py ldm "$workdir" 30
  peer 32 1 "(32, 64, 64)" 10
  python scripts/steptime.py pixel "$workdir" 10
  LDM_JAX_CPU_DEVICES=1 python scripts/steptime.py pixel "$workdir" 10
done
