"""Each mistake a user can make on the command line: one line on stderr, exit status 2,
nothing written or overwritten. Non-finite training stops with the step named."""

import gzip
import hashlib
import json
import os
import re
import shutil

import pytest

from conftest import ROOT, run_module
from ldm_jax import data


def _one_line_exit_2(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def _corrupt_copy(tmp_path, how):
    d = tmp_path / "mnist"
    shutil.copytree(data.default_data_dir(), d)
    path = d / "train-labels-idx1-ubyte.gz"
    if how == "md5":
        raw = bytearray(gzip.open(path).read())
        raw[-1] ^= 1
        with gzip.open(path, "wb") as f:
            f.write(bytes(raw))
    elif how == "truncated":
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "magic":
        raw = bytearray(gzip.open(path).read())
        raw[3] = 3  # 2049 -> 2051
        with gzip.open(path, "wb") as f:
            f.write(bytes(raw))
        sums = (d / "MD5SUMS").read_text().replace(
            hashlib.md5(gzip.open(data.default_data_dir() + "/train-labels-idx1-ubyte.gz").read())
            .hexdigest(), hashlib.md5(bytes(raw)).hexdigest())
        (d / "MD5SUMS").write_text(sums)
    return d


@pytest.mark.parametrize("how,message", [
    ("md5", "train-labels-idx1-ubyte.gz: MD5"),
    ("truncated", "train-labels-idx1-ubyte.gz: not a complete gzip stream"),
    ("magic", "IDX magic is 2051, expected 2049"),
])
def test_corrupt_data_file(tmp_path, how, message):
    d = _corrupt_copy(tmp_path, how)
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.dir={d}")
    _one_line_exit_2(r, message)
    assert not (tmp_path / "run").exists()


def _snapshot(directory):
    return {os.path.relpath(os.path.join(p, f), directory):
            hashlib.md5(open(os.path.join(p, f), "rb").read()).hexdigest()
            for p, _, files in os.walk(directory) for f in files}


def test_incompatible_workdir_is_left_byte_identical(smoke_workdir):
    before = _snapshot(smoke_workdir)
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={smoke_workdir}",
                   "--config.model.latent_ch=2")
    _one_line_exit_2(r, "was trained with model.latent_ch=4, not 2")
    r = run_module("train", "--stage=pixel", "--preset=smoke", f"--workdir={smoke_workdir}",
                   "--config.model.ch=32")
    _one_line_exit_2(r, "was trained with model.ch=16, not 32")
    assert _snapshot(smoke_workdir) == before


@pytest.mark.parametrize("args,message", [
    (["--num=0"], "--num must be positive, got 0"),
    (["--steps=-3"], "--steps must be positive, got -3"),
    (["--out=/nonexistent/dir/grid.png"], "output directory /nonexistent/dir does not exist"),
    (["--label=11"], "--label must be a digit 0-9 or 'all', got '11'"),
    (["--label=3"], "is unconditional; drop --label"),
    (["--stage=vae"], "cannot sample stage 'vae'"),
    (["--steps=100000"], "exceeds the 50 timesteps"),
])
def test_sample_bad_input(smoke_workdir, tmp_path, args, message):
    r = run_module("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'g.png'}", *args)
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


def test_sample_without_model(tmp_path):
    r = run_module("sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'g.png'}")
    _one_line_exit_2(r, "no trained ldm model")
    assert not os.listdir(tmp_path)


def test_evaluate_bad_num(tmp_path):
    r = run_module("evaluate", f"--workdir={tmp_path}", "--num=-1")
    _one_line_exit_2(r, "--num must be positive, got -1")


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    huge = ["--stage=vae", "--preset=smoke", f"--workdir={tmp_path}",
            "--config.train.steps=8", "--config.train.ckpt_every=2", "--config.optim.warmup_steps=0",
            "--config.optim.grad_clip=0", "--config.optim.lr=1e30"]
    r = run_module("train", *huge)
    assert r.returncode == 1, r.stderr[-1500:]
    m = re.search(r"non-finite loss or gradient at step (\d+)", r.stderr)
    assert m, r.stderr[-1500:]
    from ldm_jax import train
    restored = train.load_checkpoint(str(tmp_path / "vae"))
    if restored is not None:  # the latest good checkpoint stays loadable
        assert restored[2]["step"] <= int(m.group(1))
    # skip_nonfinite=true: the run finishes and counts the skipped updates.
    r = run_module("train", *huge, "--config.train.skip_nonfinite=true",
                   f"--workdir={tmp_path / 'skip'}")
    assert r.returncode == 0, r.stderr[-1500:]
    rows = [json.loads(line) for line in open(tmp_path / "skip" / "vae" / "metrics.jsonl")]
    assert rows[-1]["skipped_nonfinite"] > 0 and rows[-1]["step"] == 8


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path):
    from ldm_jax import configs, train
    c = configs.get_config("vae", "smoke")
    c.train.steps, c.train.max_minutes = 1000, 1e-6
    state = train.train_and_evaluate(c, str(tmp_path))
    _, _, meta = train.load_checkpoint(str(tmp_path / "vae"))
    assert meta["step"] == int(state.step) < 1000 and meta["stopped_by"] == "max_minutes"


def test_nothing_in_the_package_unpickles():
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|np\.load\((?![^)]*allow_pickle=False)")
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ldm_jax")):
        for f in files:
            if f.endswith(".py"):
                for i, line in enumerate(open(os.path.join(dirpath, f)), 1):
                    if pattern.search(line):
                        offenders.append(f"{f}:{i}: {line.strip()}")
    assert not offenders, offenders
