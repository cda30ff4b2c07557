"""A damaged checkpoint is detected, reported in one line and never silently used:
readers refuse and name the newest intact step, a resume falls back to it (moving the
damaged one aside) and ends equal to an uninterrupted run; one trainer per stage."""

import fcntl
import glob
import json
import os
import shutil

import chex
import pytest

from conftest import run_module
from ldm_jax import checkpoints, configs, train


def _config():
    c = configs.get_config("vae", "smoke")
    c.train.steps, c.train.ckpt_every = 6, 3
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke VAE with checkpoints at steps 3 and 6, and its final EMA parameters."""
    workdir = tmp_path_factory.mktemp("intact")
    state = train.train_and_evaluate(_config(), str(workdir))
    return workdir, state.ema_params


def _flip_bytes(path, every=64 * 1024):
    blob = bytearray(open(path, "rb").read())
    for i in range(len(blob) // 2, len(blob), every):  # the payload, past any header
        blob[i] ^= 0xFF
    open(path, "wb").write(bytes(blob))


def _damage(step_dir, how):
    data = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
                  key=os.path.getsize)
    if how == "bitflip":
        for path in data:
            _flip_bytes(path)
    elif how == "truncate":
        path = data[-1]
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how in ("_sharding", "_CHECKPOINT_METADATA", "config", "meta"):
        path = {"_sharding": "state/_sharding", "_CHECKPOINT_METADATA": "_CHECKPOINT_METADATA",
                "config": "config/metadata", "meta": "meta/metadata"}[how]
        with open(os.path.join(step_dir, path), "w") as f:
            f.write('{"garbled": ')
    elif how == "no_state":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif how == "no_commit":
        os.remove(os.path.join(step_dir, "commit_success.txt"))


HOW = ["bitflip", "truncate", "_sharding", "_CHECKPOINT_METADATA", "config", "meta",
       "no_state", "no_commit"]


def _damaged_copy(trained, tmp_path, how):
    intact, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(intact, workdir)
    _damage(os.path.join(workdir, "vae", "checkpoints", "6"), how)
    return workdir, str(workdir / "vae")


@pytest.mark.parametrize("how", HOW)
def test_readers_refuse_a_damaged_checkpoint_and_name_the_intact_one(trained, tmp_path, how):
    _, stage_dir = _damaged_copy(trained, tmp_path, how)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load_checkpoint(stage_dir)
    message = str(e.value)
    assert "step 6" in message and "--step=3" in message and "\n" not in message, message
    _, _, meta = checkpoints.load_checkpoint(stage_dir, step=3)
    assert meta["step"] == 3


# Each resume retrains 3 steps; bit flips in the default suite, every kind with -m slow.
@pytest.mark.parametrize("how", [h if h == "bitflip" else
                                 pytest.param(h, marks=pytest.mark.slow) for h in HOW])
def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, how):
    _, reference = trained
    workdir, stage_dir = _damaged_copy(trained, tmp_path, how)
    state = train.train_and_evaluate(_config(), str(workdir))
    chex.assert_trees_all_close(state.ema_params, reference, atol=1e-6, rtol=1e-6)
    assert os.path.isdir(os.path.join(stage_dir, "checkpoints", "corrupt-6"))
    params, _, meta = checkpoints.load_checkpoint(stage_dir)
    assert meta["step"] == 6 and meta["finished"]
    chex.assert_trees_all_close(params, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_sample_and_the_ldm_refuse_damaged_checkpoints_in_one_line(smoke_workdir, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(smoke_workdir, workdir)
    shutil.rmtree(workdir / "eval", ignore_errors=True)  # another test may have evaluated it
    _damage(str(workdir / "pixel" / "checkpoints" / "6"), "bitflip")
    r = run_module("sample", f"--workdir={workdir}", "--stage=pixel", f"--out={tmp_path / 'g.png'}")
    assert r.returncode == 2, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "step 6" in lines[0] and "--step=3" in lines[0], r.stderr
    assert not (tmp_path / "g.png").exists()
    r = run_module("evaluate", f"--workdir={workdir}", "--preset=smoke", "--nocost")
    assert r.returncode == 2, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "step 6" in lines[0] and "--step=3" in lines[0], r.stderr
    assert not (workdir / "eval").exists()
    r = run_module("sample", f"--workdir={workdir}", "--stage=pixel", "--step=3", "--num=2",
                   f"--out={tmp_path / 'g.png'}")
    assert r.returncode == 0 and (tmp_path / "g.png").exists(), r.stderr[-1500:]
    # The VAE under the LDM is damaged: the LDM refuses to sample or train, in one line.
    _damage(str(workdir / "vae" / "checkpoints" / "6"), "meta")
    r = run_module("sample", f"--workdir={workdir}", "--stage=ldm", f"--out={tmp_path / 'h.png'}")
    assert r.returncode == 2 and "VAE this model was trained on is damaged" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(configs.ConfigError, match="VAE this model was trained on is damaged"):
        train.train_and_evaluate(configs.get_config("ldm", "smoke"), str(workdir),
                                 stop_at_step=7)


def test_checkpoints_without_digests_load_with_a_note(trained, tmp_path, capsys):
    intact, reference = trained
    workdir = tmp_path / "w"
    shutil.copytree(intact, workdir)
    path = workdir / "vae" / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["digests"]
    path.write_text(json.dumps(meta))
    params, _, _ = checkpoints.load_checkpoint(str(workdir / "vae"))
    chex.assert_trees_all_close(params, reference)
    assert "cannot be verified" in capsys.readouterr().err


def test_a_second_trainer_on_the_same_stage_refuses(trained, tmp_path):
    intact, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(intact, workdir)
    stage_dir = workdir / "vae"
    fd = os.open(stage_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trainer holds
    try:
        before = sorted(os.listdir(stage_dir / "checkpoints"))
        r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}",
                       "--config.train.steps=9", "--config.train.ckpt_every=3")
        assert r.returncode == 2, r.stderr[-1500:]
        assert r.stderr.strip().splitlines() == [
            f"ldm_jax.train: error: another trainer is running in {stage_dir}; wait for it or "
            "use another workdir"]
        assert sorted(os.listdir(stage_dir / "checkpoints")) == before
    finally:
        os.close(fd)  # a dead trainer's lock is released by the kernel the same way
    state = train.train_and_evaluate(_config(), str(workdir))
    assert int(state.step) == 6
