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
from ldm_jax import checkpoints, configs, data, evaluate, features, pipeline, sample, score, train
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


def test_item3_readers_refuse_a_vae_the_ldm_is_not_bound_to(smoke_workdir, tmp_path):
    workdir = _copy(smoke_workdir, tmp_path, "vae", "ldm")
    for step in (3, 6):  # as if workdir/vae had been replaced by another VAE
        _edit_json(workdir / "ldm" / "checkpoints" / str(step) / "meta" / "metadata",
                   lambda m: m.update(vae_digest="0" * 64))
    message = "is not the VAE the LDM in"
    r = run_main("sample", f"--workdir={workdir}", "--stage=ldm", "--num=2",
                 f"--out={tmp_path / 'g.png'}")
    _one_line_exit_2(r, message)
    r = run_main("evaluate", f"--workdir={workdir}", "--preset=smoke", "--nocost")
    _one_line_exit_2(r, message)
    assert not (tmp_path / "g.png").exists() and not (workdir / "eval").exists()


# ----------------------------------------------------------------------------- 4. two writers


def test_item4_two_writers_of_one_out_never_mix(tmp_path, monkeypatch):
    out = str(tmp_path / "c.png")
    first, second = (np.full((2, 28, 28), v, np.uint8) for v in (1, 2))
    save_grid, nested = sample.save_grid, []

    def interleaved(images, path, ncol=None):  # run B writes all of --out inside run A's write
        if not nested:
            nested.append(1)
            sample.write_samples(out, second, None)
        save_grid(images, path, ncol)
    monkeypatch.setattr(sample, "save_grid", interleaved)
    npz = sample.write_samples(out, first, None)
    with np.load(npz, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["images"], first)  # the last to finish, whole
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "c.png"]


# ----------------------------------------------------------------------------- 5. autoguidance


@pytest.mark.slow
def test_item5_autoguidance_at_or_before_the_guide_step_is_refused(smoke_workdir, tmp_path):
    workdir = _copy(smoke_workdir, tmp_path, "pixel")
    for step in (3, 6):  # a run whose guide is its step 3
        _edit_json(workdir / "pixel" / "checkpoints" / str(step) / "config" / "metadata",
                   lambda c: c["sample"].update(guide_step=3, guide_weight=1.0))
    out = tmp_path / "g.png"
    for step, args in ((3, []), (3, ["--autoguidance=2"])):
        r = run_main("sample", f"--workdir={workdir}", "--stage=pixel", f"--step={step}",
                     "--num=2", f"--out={out}", *args)
        _one_line_exit_2(r, "autoguidance guides by step 3 (sample.guide_step), and step 3 "
                            "is that step")
    r = run_main("evaluate", f"--workdir={workdir}", "--preset=smoke", "--nocost", "--step=3",
                 "--autoguidance=1")
    _one_line_exit_2(r, "autoguidance guides by step 3")
    assert not out.exists() and not (workdir / "eval").exists()
    gen = sample.load_generator(str(workdir), "pixel", 6)  # a later step is guided by it
    assert gen.guide_step == 3 and gen.guide_params is not None


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


def test_item8_unreadable_sample_caches_are_absent(tmp_path, monkeypatch):
    gen = type("G", (), dict(stage="ldm", identity="a" * 64, step=6))()
    images = np.arange(8 * 28 * 28, dtype=np.uint8).reshape(8, 28, 28)
    evaluate.save_samples(str(tmp_path), gen, images, 5)
    path = tmp_path / "ldm_samples.npz"
    assert evaluate.cached_samples(str(tmp_path), gen, 8, 5) is not None
    for size in (path.stat().st_size // 2, 0):
        os.truncate(path, size)
        assert evaluate.cached_samples(str(tmp_path), gen, 8, 5) is None
        assert pipeline.saved_samples_info(str(path)) is None
        pipeline.check_saved_samples(str(tmp_path), "ldm", pipeline.samples_request(4, 5, "ddim", 0.0))
    # The cached reference features: a cut-off file is computed again, atomically.
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    feat_fn = lambda images: np.ones((len(images), 3), np.float32)
    first = score.reference_features(feat_fn, features.DEFAULT_PATH)
    (cached,) = os.listdir(tmp_path / "cache")
    os.truncate(tmp_path / "cache" / cached, 10)
    np.testing.assert_array_equal(score.reference_features(feat_fn, features.DEFAULT_PATH), first)
    assert os.listdir(tmp_path / "cache") == [cached]


# ----------------------------------------------------------------------------- 9. disk full


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_item9_sample_on_a_full_disk_is_one_line_and_leaves_nothing(smoke_workdir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(sample, "save_grid", _no_space)  # after the .npz's temporary file
    monkeypatch.setattr(sample, "generate", lambda gen, num, *a, **k: np.zeros((num, 28, 28),
                                                                               np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    r = run_main("sample", f"--workdir={smoke_workdir}", "--stage=pixel", "--num=2",
                 f"--out={out / 'c.png'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("ldm_jax.sample")]
    assert len(lines) == 1 and "no space left on device writing" in lines[0], r.stderr[-1500:]
    assert os.listdir(out) == []


def test_item9_training_on_a_full_disk_is_one_line_and_leaves_no_temporary(
        smoke_workdir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    workdir = _copy(smoke_workdir, tmp_path, "vae")
    ckpt_dir = workdir / "vae" / "checkpoints"

    def full(self, step, *args, **kwargs):  # Orbax got as far as its temporary directory
        os.makedirs(ckpt_dir / f"{step}.orbax-checkpoint-tmp", exist_ok=True)
        _no_space()
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}",
                 "--config.train.steps=7")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert re.search(r"^ldm_jax.train: no space left on device while saving in .*; the last "
                     r"complete checkpoint is step 6; free some space", r.stderr, re.M), r.stderr
    assert sorted(os.listdir(ckpt_dir)) == ["3", "6"]


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


def test_item12_too_few_images_are_refused_before_any_directory(tmp_path):
    d = tmp_path / "ten"
    d.mkdir()
    _write_idx(d, "train", np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8))
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
                 f"--config.data.dir={d}")
    assert not (tmp_path / "w" / "vae").exists()  # no .lock, no empty checkpoints/
    _one_line_exit_2(r, "the training set has 10 examples, fewer than one batch")


# ----------------------------------------------------------------------------- 11. Inception weights


def test_item11_cut_off_or_non_finite_inception_weights_are_one_line(tmp_path, monkeypatch):
    from ldm_jax import inception
    np.savez(tmp_path / "w.npz", **{"Conv2d_1a_3x3/conv/kernel": np.ones((3, 3, 3, 32))})
    blob = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(inception.InceptionWeightsError, match="not a whole .npz"):
        inception.load_params(str(tmp_path / "trunc.npz"))
    np.savez(tmp_path / "nan.npz", **{"Conv2d_1a_3x3/conv/kernel": np.full((3, 3, 3, 32), np.inf)})
    with pytest.raises(inception.InceptionWeightsError, match="non-finite weights"):
        inception.load_params(str(tmp_path / "nan.npz"))
    monkeypatch.setenv("LDM_JAX_INCEPTION", str(tmp_path / "trunc.npz"))
    (tmp_path / "w").mkdir()
    r = run_main("evaluate", f"--workdir={tmp_path / 'w'}", "--preset=smoke", "--inception")
    _one_line_exit_2(r, "trunc.npz is not a whole .npz file of Inception weights")


# ----------------------------------------------------------------------------- 12. messages


@pytest.mark.slow
def test_item12_sigterm_is_one_line_and_a_leftover_temporary_is_silent(smoke_workdir, tmp_path):
    """SIGTERM stops like Ctrl-C (one line, 143); a temporary directory an earlier write
    left behind is removed without an absl WARNING."""
    workdir = _copy(smoke_workdir, tmp_path, "vae")
    ckpt_dir = workdir / "vae" / "checkpoints"
    # What a run killed while writing step 9 leaves (Orbax's name); the rerun writes step 9.
    shutil.copytree(ckpt_dir / "6", ckpt_dir / "9.orbax-checkpoint-tmp")
    os.remove(ckpt_dir / "9.orbax-checkpoint-tmp" / "commit_success.txt")
    proc = subprocess.Popen([sys.executable, "-m", "ldm_jax.train", "--stage=vae",
                             "--preset=smoke", f"--workdir={workdir}", "--config.train.steps=400",
                             "--config.train.ckpt_every=3"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (ckpt_dir / "9" / "commit_success.txt").exists() and time.time() - t0 < 300:
        assert proc.poll() is None, proc.stderr.read()[-1500:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, (proc.returncode, err[-1500:])
    assert "WARNING" not in err and "Traceback" not in err, err[-1500:]
    assert re.search(r"^ldm_jax.train: interrupted; the latest complete checkpoint is step \d+ in "
                     r".*; rerun the same command to resume$", err, re.M), err[-1500:]
    assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]


# ----------------------------------------------------------------------------- decided items


def test_a_partly_written_last_log_row_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "lo')
    train._truncate_log(str(path), 4)
    assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
