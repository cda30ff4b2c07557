"""Training killed with SIGKILL (between steps and in the middle of a checkpoint write)
resumes from the latest complete checkpoint and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import pytest

from conftest import ROOT
from ldm_jax import checkpoints, configs, train

ARGS = ["--stage=vae", "--preset=smoke", "--config.train.steps=12", "--config.train.ckpt_every=2"]


def _config():
    c = configs.get_config("vae", "smoke")
    c.train.steps, c.train.ckpt_every = 12, 2
    return c


def _start(workdir):
    return subprocess.Popen([sys.executable, "-m", "ldm_jax.train", f"--workdir={workdir}", *ARGS],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ckpt_dir, predicate, timeout=300):
    """SIGKILLs proc as soon as predicate(names in ckpt_dir) holds; returns those names."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        names = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
        if predicate(names):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return names
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill point: {proc.stderr.read()[-1000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("kill point not reached")


def _complete_steps(names):
    return sorted(int(n) for n in names if n.isdigit())


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_sigkill_at_several_points_then_resume_matches_uninterrupted(tmp_path):
    reference = train.train_and_evaluate(_config(), str(tmp_path / "reference"))
    workdir = tmp_path / "killed"
    ckpt_dir = workdir / "vae" / "checkpoints"

    # 1. In the middle of writing the very first checkpoint: nothing complete to load.
    names = _kill_when(_start(workdir), ckpt_dir, lambda n: any("tmp" in x for x in n))
    assert not _complete_steps(names)
    assert checkpoints.load_checkpoint(str(workdir / "vae")) is None

    # 2. Between steps, right after a checkpoint completed.
    names = _kill_when(_start(workdir), ckpt_dir, lambda n: 6 in _complete_steps(n))
    _, _, meta = checkpoints.load_checkpoint(str(workdir / "vae"))
    assert meta["step"] >= 6 and not meta["finished"]

    # 3. In the middle of a later write: the half-written step is never loaded.
    names = _kill_when(_start(workdir), ckpt_dir,
                       lambda n: any(x.startswith(("8.", "10.")) and "tmp" in x for x in n))
    latest = max(_complete_steps(names))
    _, _, meta = checkpoints.load_checkpoint(str(workdir / "vae"))
    assert meta["step"] == latest and latest in (6, 8)

    # 4. The same command again finishes the run.
    r = subprocess.run([sys.executable, "-m", "ldm_jax.train", f"--workdir={workdir}", *ARGS],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    params, _, meta = checkpoints.load_checkpoint(str(workdir / "vae"))
    assert meta["step"] == 12 and meta["finished"]
    chex.assert_trees_all_close(params, reference.ema_params, atol=1e-6, rtol=1e-6)
    # The log holds each step once, whatever the kills redid, and its time only grows.
    rows = [json.loads(line) for line in open(workdir / "vae" / "metrics.jsonl")]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps
    assert [row["time"] for row in rows] == sorted(row["time"] for row in rows)
