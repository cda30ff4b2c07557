"""Trust, fifth round: eight faults a probe of the converter, the caches, the holdout and
sample's outputs found on 2026-12-07. Each test names its item; each failed on the code
before the fix (see the commit message)."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, run_main
from ldm_jax import configs, convert_inception, data, inception, score, train

CLASSIFIER = os.path.join(os.path.dirname(data.__file__), "assets", "classifier.npz")


def _one_line_exit_2(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-1500:]


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_item1_convert_refuses_another_source_and_an_existing_out(tmp_path):
    src = tmp_path / "other.pt"
    with zipfile.ZipFile(src, "w") as z:  # a zip, as TorchScript is, but not default_1.pt
        z.writestr("archive/data.pkl", b"not the FID network")
    r = run_main("convert_inception", f"--src={src}", f"--out={tmp_path / 'new.npz'}")
    _one_line_exit_2(r, "not default_1.pt's")
    assert not (tmp_path / "new.npz").exists()
    (tmp_path / "weights.npz").write_bytes(b"weights a user relies on")
    r = run_main("convert_inception", f"--src={src}", f"--out={tmp_path / 'weights.npz'}")
    _one_line_exit_2(r, "exists; move it away first")
    assert (tmp_path / "weights.npz").read_bytes() == b"weights a user relies on"


def test_item2_convert_writes_under_a_unique_temporary_name(tmp_path):
    out = tmp_path / "w.npz"
    os.mkdir(str(out) + ".tmp")  # the fixed name two converters used to share
    convert_inception.save_npz({"a": np.arange(3.0)}, str(out))
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["a"], np.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["w.npz", "w.npz.tmp"]


def test_item3_sample_refuses_to_replace_an_npz_that_is_not_samples(smoke_workdir, tmp_path):
    shutil.copy(CLASSIFIER, tmp_path / "mine.npz")
    before = _md5(tmp_path / "mine.npz")
    r = run_main("sample", f"--workdir={smoke_workdir}", "--stage=pixel", "--num=2",
                 f"--out={tmp_path / 'mine.png'}")
    _one_line_exit_2(r, "mine.npz exists and is not a samples file")
    assert _md5(tmp_path / "mine.npz") == before and not (tmp_path / "mine.png").exists()
    for _ in range(2):  # a samples file of an earlier run is replaced, as before
        r = run_main("sample", f"--workdir={smoke_workdir}", "--stage=pixel", "--num=2",
                     f"--out={tmp_path / 's.png'}")
        assert r.returncode == 0, r.stderr[-1500:]


@pytest.mark.parametrize("holdout", [0, -5, 60_000])
def test_item4_a_holdout_that_is_not_a_part_of_the_training_set_is_refused(holdout):
    with pytest.raises(ValueError, match="holdout must be in"):
        score.split_images("val", holdout)  # train[-0:] was all 60,000
    if holdout:
        with pytest.raises(ValueError, match="holdout must be in"):
            score.floor_images(10, holdout)
    else:  # the floor may come from every training image (test split only)
        assert score.floor_images(10, holdout).shape == (10, 28, 28)


def test_item5_val_scores_of_a_model_that_trained_on_the_val_split_are_refused():
    def cfg(holdout, max_examples):
        return {"data": {"holdout": holdout, "max_examples": max_examples}}
    with pytest.raises(ValueError, match="trained on the first 60,000 training images, includ"):
        score.check_val_unseen(cfg(0, 0), 2000, "w")
    with pytest.raises(ValueError, match="pass --holdout=1000 or less"):
        score.check_val_unseen(cfg(1000, 0), 2000, "w")
    score.check_val_unseen(cfg(2000, 0), 2000, "w")  # the presets
    score.check_val_unseen(cfg(0, 512), 2000, "w")  # smoke: the first 512 only
    assert data.trained_on(cfg(2000, 0)["data"]) == 58_000


def test_item6_an_ldm_refuses_a_vae_that_trained_on_its_holdout(tmp_path):
    r = run_main("pipeline", f"--workdir={tmp_path / 'p'}", "--preset=smoke",
                 "--config.vae.data.max_examples=0", "--config.ldm.data.holdout=2000")
    _one_line_exit_2(r, "into the last 2,000 this LDM holds out")  # before the VAE trains
    assert not (tmp_path / "p" / "vae").exists()
    workdir = str(tmp_path / "w")
    c = configs.get_config("vae", "smoke")
    c.data.max_examples = 0  # all 60,000, the holdout 0
    train.train_and_evaluate(c, workdir)
    r = run_main("train", "--stage=ldm", "--preset=smoke", f"--workdir={workdir}",
                 "--config.data.holdout=2000", "--config.data.max_examples=0")
    _one_line_exit_2(r, "into the last 2,000 this LDM holds out")
    assert sorted(os.listdir(workdir)) == ["vae"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "inception_probe.py"),
                        f"--vae={workdir}", "--splits=val", "--noinception"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    _one_line_exit_2(r, "including the last 2,000 (the val split)")  # item 5, a script


def test_item7_a_whole_npz_of_other_weights_is_refused_by_the_cheap_check():
    with pytest.raises(inception.InceptionWeightsError, match="does not match InceptionV3"):
        inception.check_weights_file(CLASSIFIER)  # evaluate runs it before sampling


def test_item7_evaluate_refuses_missing_inception_weights_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_INCEPTION", str(tmp_path / "none.npz"))
    (tmp_path / "w").mkdir()
    r = run_main("evaluate", f"--workdir={tmp_path / 'w'}", "--preset=smoke", "--inception")
    _one_line_exit_2(r, "none.npz; convert them once")  # it sampled first, then gave 1 of 4 lines
    assert not os.listdir(tmp_path / "w")


@pytest.mark.parametrize("md5sums,message", [
    ("", "no MD5 for"),
    ("abc train-images-idx3-ubyte extra\n", "expected 'MD5 NAME'"),
    ("abc t10k-images-idx3-ubyte\n", "expected 'MD5 NAME'"),  # a cut-off digest
])
def test_item8_a_malformed_md5sums_is_a_data_error(tmp_path, md5sums, message):
    shutil.copytree(data.default_data_dir(), tmp_path / "mnist")
    (tmp_path / "mnist" / "MD5SUMS").write_text(md5sums)
    with pytest.raises(data.DataError, match=message):
        data.load_mnist("test", str(tmp_path / "mnist"))
