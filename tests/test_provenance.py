"""Nothing a user trained is silently broken: a VAE under an LDM is frozen, an LDM
resumes on the VAE it was trained on, budgets and LR schedules survive a resume, logs
tell the truth, Ctrl-C leaves the last checkpoint intact, and the pipeline never
replaces a grid drawn with other settings."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

from conftest import ROOT, run_main, run_module
from ldm_jax import checkpoints, configs, train


def _snapshot(directory):
    return {os.path.relpath(os.path.join(p, f), directory):
            hashlib.md5(open(os.path.join(p, f), "rb").read()).hexdigest()
            for p, _, files in os.walk(directory) for f in files}


def _rows(workdir, stage):
    return [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]


def _config(stage="vae", **train_fields):
    c = configs.get_config(stage, "smoke")
    for k, v in train_fields.items():
        c.train[k] = v
    return c


@pytest.mark.slow
def test_vae_under_an_ldm_cannot_be_trained_further(smoke_workdir, tmp_path):
    """Item 1: training the VAE on (with keep_checkpoints=1, which would rotate away the
    step the LDM was trained on) is refused in one line and changes nothing."""
    workdir = tmp_path / "w"
    shutil.copytree(smoke_workdir, workdir)
    before = _snapshot(workdir)
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}",
                   "--config.train.steps=8", "--config.train.keep_checkpoints=1")
    assert r.returncode == 2, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "first stage of the LDM" in lines[0], r.stderr
    assert "new workdir" in lines[0]
    assert _snapshot(workdir) == before
    # The same finished config is a no-op, not an error.
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}")
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr[-1500:]


@pytest.mark.slow  # CI margin: 42-58 s each; the default run measured 10 min 17 s on 2026-11-26 evening
def test_ldm_resumes_on_the_vae_it_was_trained_on(smoke_workdir, tmp_path):
    """Item 2: an LDM resume never re-encodes with another VAE: a different VAE put in
    workdir/vae (same step) is refused, and the stored VAE step, digest and scale are kept."""
    w = tmp_path / "w"
    shutil.copytree(smoke_workdir, w)
    first = checkpoints.stored_meta(str(w / "ldm"))
    other = _config("vae")
    other.seed = 1
    train.train_and_evaluate(other, str(tmp_path / "other"))
    os.rename(w / "vae", tmp_path / "vae-original")
    shutil.copytree(tmp_path / "other" / "vae", w / "vae")  # same step, other weights
    longer = _config("ldm", steps=8)
    with pytest.raises(configs.ConfigError, match="not the VAE the LDM"):
        train.train_and_evaluate(longer, str(w))
    shutil.rmtree(w / "vae")
    os.rename(tmp_path / "vae-original", w / "vae")
    train.train_and_evaluate(longer, str(w))
    last = checkpoints.stored_meta(str(w / "ldm"))
    assert last["step"] == 8 and last["finished"]
    for k in ("vae_step", "vae_digest", "scale_factor"):
        assert last[k] == first[k], k


@pytest.mark.slow
def test_budget_stop_is_final_and_cumulative(tmp_path):
    """Item 3: a max_minutes stop is final for that budget (a rerun trains nothing), and
    the budget counts time over every resume."""
    c = _config(steps=1000, max_minutes=1e-6)
    state = train.train_and_evaluate(c, str(tmp_path))
    meta = checkpoints.stored_meta(str(tmp_path / "vae"))
    assert meta["finished"] and meta["stopped_by"] == "max_minutes"
    assert meta["step"] == int(state.step) < 1000 and meta["train_seconds"] > 0
    again = train.train_and_evaluate(c, str(tmp_path))
    assert int(again.step) == meta["step"]
    assert checkpoints.stored_meta(str(tmp_path / "vae"))["step"] == meta["step"]
    assert train.is_finished(c, 5, 1e-3) and not train.is_finished(c, 5, 0.0)
    assert not train.is_finished(_config(steps=1000, max_minutes=0.0), 999, 1e9)


@pytest.mark.slow  # CI margin: 42-58 s each; the default run measured 10 min 17 s on 2026-11-26 evening
def test_lr_schedule_survives_a_resume(tmp_path):
    """Item 4: the LR of a resumed run equals the uninterrupted run's at every step, and
    a resume with more steps keeps the first run's schedule instead of jumping back up."""
    c = _config(steps=6, log_every=1)
    c.optim.warmup_steps, c.optim.lr = 2, 1e-3
    train.train_and_evaluate(c, str(tmp_path / "full"))
    train.train_and_evaluate(c, str(tmp_path / "split"), stop_at_step=3)
    train.train_and_evaluate(c, str(tmp_path / "split"))
    full, split = _rows(tmp_path / "full", "vae"), _rows(tmp_path / "split", "vae")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["lr"] for r in split], [r["lr"] for r in full], rtol=1e-7)
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 6, end_value=1e-4)
    np.testing.assert_allclose([r["lr"] for r in full], [reference(s) for s in range(6)],
                               rtol=1e-6)
    longer = _config(steps=9, log_every=1)
    longer.optim.warmup_steps, longer.optim.lr = 2, 1e-3
    train.train_and_evaluate(longer, str(tmp_path / "full"))
    rows = _rows(tmp_path / "full", "vae")
    assert [r["step"] for r in rows] == list(range(1, 10))
    np.testing.assert_allclose([r["lr"] for r in rows[6:]], 1e-4, rtol=1e-6)
    assert checkpoints.stored_meta(str(tmp_path / "full" / "vae"))["schedule_steps"] == 6


@pytest.mark.slow  # CI margin (30 s); tests/test_kill_resume.py (also slow) checks logs after kills
def test_logs_hold_interval_means_cumulative_time_and_no_duplicates(tmp_path):
    every = _config(steps=6, log_every=1)
    train.train_and_evaluate(every, str(tmp_path / "a"))
    pairs = _config(steps=6, log_every=2)
    train.train_and_evaluate(pairs, str(tmp_path / "b"), stop_at_step=4)
    # A killed run logged steps past its last checkpoint (4): they are redone, not repeated.
    with open(tmp_path / "b" / "vae" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 0.0, "time": 1e9}) + "\n")
    train.train_and_evaluate(pairs, str(tmp_path / "b"))
    a, b = _rows(tmp_path / "a", "vae"), _rows(tmp_path / "b", "vae")
    assert [r["step"] for r in b] == [2, 4, 6]
    for row in b:  # each row is the mean over its interval, not its last step
        s = row["step"]
        np.testing.assert_allclose(row["loss"], np.mean([a[s - 2]["loss"], a[s - 1]["loss"]]),
                                   rtol=1e-5)
    assert a[0]["loss"] != a[1]["loss"]
    times = [r["time"] for r in b]
    assert times == sorted(times) and times[-1] >= times[1] > 0  # counts across the resume
    meta = checkpoints.stored_meta(str(tmp_path / "b" / "vae"))
    assert meta["train_seconds"] >= times[1]


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_ctrl_c_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    args = ["--stage=vae", "--preset=smoke", f"--workdir={tmp_path}",
            "--config.train.steps=100000", "--config.train.ckpt_every=2",
            "--config.train.log_every=1000"]
    # xdist workers ignore SIGINT and children inherit that: restore it, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "ldm_jax.train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt_dir = tmp_path / "vae" / "checkpoints"
    t0 = time.time()
    while not (ckpt_dir.is_dir() and any(n.isdigit() and int(n) >= 4 for n in os.listdir(ckpt_dir))):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-1500:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    messages = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "vae:" not in l
                and "%|" not in l]
    assert len(messages) == 1 and messages[0].startswith("ldm_jax.train: interrupted"), err[-3000:]
    assert "Traceback" not in err
    params, _, meta = checkpoints.load_checkpoint(str(tmp_path / "vae"))
    assert f"step {meta['step']}" in messages[0] and meta["step"] >= 4


@pytest.mark.slow  # CI margin: 42-58 s each; the default run measured 10 min 17 s on 2026-11-26 evening
def test_pipeline_never_replaces_a_different_grid(tmp_path):
    """Item 5: a rerun with the same settings redraws nothing; another --num is refused
    before any work; `--config.<stage>.*` overrides reach that stage only."""
    w = tmp_path / "w"
    r = run_main("pipeline", f"--workdir={w}", "--preset=smoke", "--num=4",
                   "--config.ldm.train.steps=4")
    assert r.returncode == 0, r.stderr[-1500:]
    assert checkpoints.stored_meta(str(w / "ldm"))["step"] == 4
    assert checkpoints.stored_meta(str(w / "vae"))["step"] == 6
    with np.load(w / "ldm_samples.npz", allow_pickle=False) as z:
        images = z["images"]
        provenance = json.loads(str(z["provenance"]))
    assert images.shape == (4, 28, 28) and provenance["num"] == 4 and provenance["step"] == 4
    before = _snapshot(w)
    r = run_main("pipeline", f"--workdir={w}", "--preset=smoke", "--num=4",
                   "--config.ldm.train.steps=4")
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr[-1500:]
    r = run_main("pipeline", f"--workdir={w}", "--preset=smoke", "--num=9",
                   "--config.ldm.train.steps=4")
    assert r.returncode == 2 and "num=4" in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_main("pipeline", f"--workdir={w}", "--preset=smoke", "--stages=",)
    assert r.returncode == 2 and "--stages is empty" in r.stderr, r.stderr[-1500:]
    r = run_main("pipeline", f"--workdir={w}", "--preset=smoke", "--config.pixel.seed=3")
    assert r.returncode == 2 and "not in --stages" in r.stderr, r.stderr[-1500:]
    assert _snapshot(w) == before
