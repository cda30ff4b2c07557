"""Trust, fourth round: six faults a probe of the entry points found on 2026-12-07. Each
test names its item; each failed on the code before the fix (see the commit message)."""

import glob
import json
import os
import shutil

import pytest

from conftest import run_main
from ldm_jax import configs, evaluate, train


def _one_line_exit_2(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-1500:]


def _listing(directory):
    """Every path under directory with its size and mtime: what 'nothing written' compares."""
    out = []
    for p, ds, fs in os.walk(directory):
        for name in fs + ds:
            st = os.stat(os.path.join(p, name))
            out.append((os.path.relpath(os.path.join(p, name), directory), st.st_size,
                        st.st_mtime_ns if name in fs else 0))
    return sorted(out)


@pytest.fixture(scope="module")
def student_workdir(smoke_workdir, tmp_path_factory):
    """smoke_workdir's vae and ldm, with a smoke student of the ldm."""
    workdir = str(tmp_path_factory.mktemp("student"))
    for stage in ("vae", "ldm"):
        shutil.copytree(os.path.join(smoke_workdir, stage), os.path.join(workdir, stage))
    train.train_and_evaluate(configs.get_config("distill", "smoke"), workdir)
    return workdir


def test_item1_eta_min_t_with_another_sampler_is_refused_before_training(tmp_path):
    r = run_main("pipeline", f"--workdir={tmp_path / 'w'}", "--preset=smoke",
                 "--config.ldm.sample.eta_min_t=10")  # smoke samples with dpmpp2m
    _one_line_exit_2(r, "sample.eta_min_t=10 is for the ddim sampler, not dpmpp2m")
    assert not os.listdir(tmp_path)


def test_item2_pipeline_refuses_to_leave_a_student_behind_before_training(student_workdir,
                                                                          tmp_path):
    workdir = shutil.copytree(student_workdir, tmp_path / "w")
    before = _listing(workdir)
    r = run_main("pipeline", f"--workdir={workdir}", "--preset=smoke", "--stages=ldm,distill",
                 "--config.ldm.train.steps=8")
    _one_line_exit_2(r, "training ldm further would leave behind the student")
    assert _listing(workdir) == before
    r = run_main("sample", f"--workdir={workdir}", "--stage=distill", "--num=4",
                 f"--out={tmp_path / 's.png'}")
    assert r.returncode == 0, r.stderr[-1500:]  # the student still samples


def test_item2_a_vae_under_its_ldm_is_refused_before_an_earlier_stage_trains(smoke_workdir,
                                                                            tmp_path):
    workdir = tmp_path / "w"
    for stage in ("vae", "ldm", "pixel"):
        shutil.copytree(os.path.join(smoke_workdir, stage), workdir / stage)
    before = _listing(workdir)
    r = run_main("pipeline", f"--workdir={workdir}", "--preset=smoke", "--stages=pixel,vae,ldm",
                 "--config.pixel.train.steps=8", "--config.vae.train.steps=8")
    _one_line_exit_2(r, "cannot be trained further in place")
    assert _listing(workdir) == before


@pytest.mark.parametrize("name", ["ldm_samples.npz", "ldm_samples.png"])
def test_item3_a_grid_path_that_is_a_directory_is_refused_before_training(tmp_path, name):
    workdir = tmp_path / "w"
    os.makedirs(workdir / name)
    r = run_main("pipeline", f"--workdir={workdir}", "--preset=smoke")
    _one_line_exit_2(r, "where the ldm grid goes, is a directory")
    assert sorted(os.listdir(workdir)) == [name] and not os.listdir(workdir / name)


@pytest.mark.parametrize("blocker,message", [
    ("eval", "is a file; evaluate writes its outputs in that directory"),
    ("eval/metrics.json/", "metrics.json, which evaluate writes, is a directory"),
    ("eval/ldm_samples.npz/", "ldm_samples.npz, which evaluate writes, is a directory"),
])
def test_item4_evaluate_refuses_outputs_it_cannot_write_before_sampling(smoke_workdir, tmp_path,
                                                                       blocker, message):
    workdir = tmp_path / "w"
    for stage in ("vae", "ldm"):
        shutil.copytree(os.path.join(smoke_workdir, stage), workdir / stage)
    if blocker.endswith("/"):
        os.makedirs(workdir / blocker)
    else:
        (workdir / blocker).write_text("")
    before = _listing(workdir)
    r = run_main("evaluate", f"--workdir={workdir}", "--preset=smoke", "--num=16", "--nocost")
    _one_line_exit_2(r, message)
    assert _listing(workdir) == before


def test_item5_a_teacher_saved_without_digests_is_one_line(smoke_workdir, tmp_path):
    workdir = tmp_path / "w"
    for stage in ("vae", "ldm"):
        shutil.copytree(os.path.join(smoke_workdir, stage), workdir / stage)
    for path in glob.glob(str(workdir / "*" / "checkpoints" / "*" / "meta" / "metadata")):
        meta = json.loads(open(path).read())
        for key in ("digests", "vae_digest"):
            meta.pop(key, None)
        open(path, "w").write(json.dumps(meta))
    r = run_main("train", "--stage=distill", "--preset=smoke", f"--workdir={workdir}")
    _one_line_exit_2(r, "was saved without weight digests, so no student can be bound to it")
    assert not os.path.exists(workdir / "distill")


def test_item6_ctrl_c_in_evaluate_is_one_line(smoke_workdir, tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    shutil.copytree(os.path.join(smoke_workdir, "vae"), workdir / "vae")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    r = run_main("evaluate", f"--workdir={workdir}", "--preset=smoke", "--num=16", "--nocost")
    assert r.returncode == 130, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], r.stderr
