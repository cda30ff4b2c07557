"""Two processes through jax.distributed (CPU collectives over gloo on 127.0.0.1) end with
the same parameters as one process with the same global batch."""

import pytest
import json
import os
import socket
import subprocess
import sys

import chex
import numpy as np

from conftest import ROOT
from ldm_jax import checkpoints

ARGS = ["-m", "ldm_jax.train", "--stage=vae", "--preset=smoke"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "vae", "metrics.jsonl"))]


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
@pytest.mark.parametrize("device_data", ["0", "1"])  # host batches | split dataset, drawn in-step
def test_two_processes_match_one(tmp_path, device_data):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    one = subprocess.run([sys.executable, *ARGS, f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    env["LDM_JAX_DEVICE_DATA"] = device_data
    assert one.returncode == 0, one.stderr[-1500:]

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *ARGS, f"--workdir={tmp_path / 'two'}",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
    assert "Rank 0 is connected to 1 peer" in "".join(errs)  # really two processes over gloo

    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    a, _, meta_a = checkpoints.load_checkpoint(str(tmp_path / "one" / "vae"))
    b, _, meta_b = checkpoints.load_checkpoint(str(tmp_path / "two" / "vae"))
    assert meta_a["step"] == meta_b["step"] == 6 and meta_b["finished"]
    chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)
