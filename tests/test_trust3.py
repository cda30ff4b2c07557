"""Issue 26, "Trust, third round": a checkpoint is what its meta says it is, readers check
the VAE binding, nothing intact is moved aside, and twelve faults found by probing. Each
test names its item; each failed on the code before the fix (see the commit message)."""

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_main
from ldm_jax import checkpoints, configs, data, evaluate, features, pipeline, sample, train
from test_integrity import _damage


def _one_line_exit_2(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-1500:]


def _copy(smoke_workdir, tmp_path, *stages, name="w"):
    workdir = tmp_path / name
    for stage in stages:
        shutil.copytree(os.path.join(smoke_workdir, stage), workdir / stage)
    return workdir


def _swap(ckpt_dir, a, b):
    os.rename(ckpt_dir / str(a), ckpt_dir / "t")
    os.rename(ckpt_dir / str(b), ckpt_dir / str(a))
    os.rename(ckpt_dir / "t", ckpt_dir / str(b))


def _listing(directory):
    return sorted(os.path.relpath(os.path.join(p, f), directory)
                  for p, ds, fs in os.walk(directory) for f in fs + ds)


def _edit_json(path, fn):
    value = json.loads(open(path).read())
    fn(value)
    open(path, "w").write(json.dumps(value))


# ----------------------------------------------------------------------------- 1. swapped steps


def test_item1_swapped_step_directories_are_refused_everywhere(smoke_workdir, tmp_path):
    workdir = _copy(smoke_workdir, tmp_path, "vae", "ldm")
    _swap(workdir / "ldm" / "checkpoints", 3, 6)
    before = _listing(workdir)
    for step in (None, 3, 6):
        with pytest.raises(checkpoints.CheckpointError, match="renamed or swapped"):
            checkpoints.load_checkpoint(str(workdir / "ldm"), step)
    out = tmp_path / "g.png"
    for module, args in (("sample", ["--stage=ldm", f"--out={out}", "--num=2"]),
                         ("evaluate", ["--preset=smoke", "--nocost"]),
                         ("benchmark", ["--stage=ldm", "--what=generate", "--preset=smoke"]),
                         ("train", ["--stage=ldm", "--preset=smoke"])):
        r = run_main(module, f"--workdir={workdir}", *args)
        _one_line_exit_2(r, "holds the checkpoint of step 6 (its meta.step), not step 3")
    assert _listing(workdir) == before and not out.exists()
    _swap(workdir / "vae" / "checkpoints", 3, 6)  # and the VAE the LDM decodes with
    with pytest.raises(checkpoints.CheckpointError, match="renamed or swapped"):
        checkpoints.load_vae(str(workdir), 6)


# ----------------------------------------------------------------------------- 2. nothing intact aside


def test_item2_a_state_that_does_not_fit_is_refused_and_left_in_place(smoke_workdir, tmp_path):
    workdir = _copy(smoke_workdir, tmp_path, "vae")
    for step in (3, 6):  # the config edited on disk, as after a code change
        _edit_json(workdir / "vae" / "checkpoints" / str(step) / "config" / "metadata",
                   lambda c: c["model"].update(latent_ch=2))
    before = _listing(workdir)
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}",
                 "--config.model.latent_ch=2", "--config.train.steps=9")
    _one_line_exit_2(r, "checkpoint step 6 in")
    assert "does not fit this run's model" in r.stderr and "left in place" in r.stderr
    assert _listing(workdir) == before  # nothing moved aside, nothing trained


def test_item2_only_integrity_evidence_counts_as_damage():
    where = "checkpoint step 6 in w"
    damaged = [ValueError('OUT_OF_RANGE: Error reading "x" in OCDBT database'),
               ValueError("FAILED_PRECONDITION: Invalid JSON"), FileNotFoundError("gone")]
    intact = [MemoryError(), RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating"),
              TypeError("unexpected keyword argument in a newer Orbax"), KeyError("params")]
    for e in damaged:
        assert isinstance(checkpoints._restore_error(e, where), checkpoints.CheckpointDamaged)
    for e in intact:
        error = checkpoints._restore_error(e, where)
        assert not isinstance(error, checkpoints.CheckpointDamaged), e
        assert "left in place" in str(error) and "\n" not in str(error)


def test_item2_a_run_never_restarts_from_0_over_checkpoints(smoke_workdir, tmp_path):
    workdir = _copy(smoke_workdir, tmp_path, "vae")
    for step in (3, 6):
        _damage(str(workdir / "vae" / "checkpoints" / str(step)), "no_commit")
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}")
    assert r.returncode == 2, r.stderr[-1500:]
    assert re.search(r"^ldm_jax.train: error: no checkpoint in .* is intact", r.stderr, re.M)
    names = sorted(os.listdir(workdir / "vae" / "checkpoints"))
    assert names == ["corrupt-3", "corrupt-6"], names  # moved aside, nothing trained


# ----------------------------------------------------------------------------- 3. VAE binding


# ----------------------------------------------------------------------------- 4. two writers


# ----------------------------------------------------------------------------- 5. autoguidance


# ----------------------------------------------------------------------------- 6. NaN classifier


def test_item6_a_classifier_with_nan_weights_is_refused(tmp_path):
    with np.load(features.DEFAULT_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in sorted(arrays) if not k.startswith("meta/"))
    arrays[key] = np.full_like(arrays[key], np.nan)
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(features.ClassifierError, match="non-finite weights"):
        features.load_classifier(str(tmp_path / "nan.npz"))
    r = run_main("evaluate", f"--workdir={tmp_path}", "--preset=smoke",
                 f"--classifier={tmp_path / 'nan.npz'}")
    _one_line_exit_2(r, "holds non-finite weights")
    nan_features = features._batched(lambda x: x.reshape(len(x), -1) * np.nan, 4)
    with pytest.raises(features.ClassifierError, match="non-finite"):
        nan_features(np.zeros((3, 28, 28), np.uint8))


# ----------------------------------------------------------------------------- 7. quarantine path


def test_item7_quarantine_path_is_built_from_the_stage_directory(smoke_workdir, tmp_path):
    import jax
    import orbax.checkpoint as ocp
    from ldm_jax import stages
    workdir = _copy(smoke_workdir, tmp_path / "6", "vae", name="run")  # .../6/run/vae/...
    _damage(str(workdir / "vae" / "checkpoints" / "6"), "no_commit")
    c = configs.get_config("vae", "smoke")
    task = stages.TASKS["vae"](c, str(workdir))
    tx = train.make_optimizer(c.optim, c.train.steps)

    def init(key):  # the state train._run restores into, as shapes only
        params, model_state = task.init(key)
        return train.TrainState.create(apply_fn=None, params=params, tx=tx, ema_params=params,
                                       model_state=model_state)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.eval_shape(init, jax.random.key(0)))
    state, meta = checkpoints.restore_for_training(str(workdir / "vae"), target)
    assert meta["step"] == 3 and int(state.step) == 3
    assert sorted(os.listdir(workdir / "vae" / "checkpoints")) == ["3", "corrupt-6"]


# ----------------------------------------------------------------------------- 8. unreadable caches


# ----------------------------------------------------------------------------- 9. disk full


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- 10, 12c. data sets


def _write_idx(directory, split, images, labels):
    """An IDX pair (gzip) and MD5SUMS lines for it, as data.load_mnist reads them."""
    names = data.FILES[split]
    header = np.array([data.IMAGE_MAGIC, len(images), *images.shape[1:]], ">u4").tobytes()
    raws = (header + images.tobytes(),
            np.array([data.LABEL_MAGIC, len(labels)], ">u4").tobytes() + labels.tobytes())
    sums = []
    for name, raw in zip(names, raws):
        with gzip.open(directory / f"{name}.gz", "wb") as f:
            f.write(raw)
        sums.append(f"{hashlib.md5(raw).hexdigest()}  {name}\n")
    with open(directory / "MD5SUMS", "a") as f:
        f.writelines(sums)


def test_item10_images_of_another_size_are_refused(tmp_path):
    d = tmp_path / "idx32"
    d.mkdir()
    _write_idx(d, "train", np.zeros((20, 32, 32), np.uint8), np.zeros(20, np.uint8))
    with pytest.raises(data.DataError, match="images are 32x32, expected 28x28"):
        data.load_mnist("train", str(d))
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
                 f"--config.data.dir={d}")
    _one_line_exit_2(r, "images are 32x32, expected 28x28")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- 11. Inception weights


# ----------------------------------------------------------------------------- 12. messages


# ----------------------------------------------------------------------------- decided items

