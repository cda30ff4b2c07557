"""Storage that Colab and TPU users have (issue 30): a workdir on a filesystem that refuses
flock (some FUSE mounts, such as Google Drive's), and a URL workdir, which is refused."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import run_main, run_module
from ldm_jax import checkpoints, configs


@pytest.fixture
def no_flock(monkeypatch):
    """flock fails as on a FUSE mount without lock support."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(checkpoints.fcntl, "flock", refuse)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_file_refuses_a_second_holder(no_flock, tmp_path):
    stage_dir = str(tmp_path / "vae")
    with checkpoints.stage_lock(stage_dir):
        with open(os.path.join(stage_dir, ".lock.holder")) as f:
            assert json.load(f) == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(configs.ConfigError) as e:
            with checkpoints.stage_lock(stage_dir):
                pytest.fail("a second holder got the lock")
    # The flock path's wording, on one line.
    assert str(e.value) == (f"another trainer is running in {stage_dir}; wait for it or use "
                            "another workdir")


def test_lock_file_of_a_dead_process_is_taken_over(no_flock, tmp_path, capsys):
    stage_dir = tmp_path / "vae"
    stage_dir.mkdir()
    pid = dead_pid()
    (stage_dir / ".lock.holder").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    with checkpoints.stage_lock(str(stage_dir)):
        assert json.loads((stage_dir / ".lock.holder").read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"left by pid {pid}" in err[0] and "taking it over" in err[0], err


def test_lock_file_of_another_host_is_refused_with_what_to_do(no_flock, tmp_path):
    stage_dir = tmp_path / "vae"
    stage_dir.mkdir()
    holder = stage_dir / ".lock.holder"
    holder.write_text(json.dumps({"host": "elsewhere", "pid": dead_pid()}))
    with pytest.raises(configs.ConfigError, match=f"on host elsewhere; if that run is gone, "
                                                  f"delete {holder}"):
        with checkpoints.stage_lock(str(stage_dir)):
            pass
    assert holder.exists()  # not ours to remove


def test_lock_file_is_removed_on_release(no_flock, tmp_path):
    stage_dir = str(tmp_path / "vae")
    holder = os.path.join(stage_dir, ".lock.holder")
    with checkpoints.stage_lock(stage_dir):
        assert os.path.exists(holder)
    assert not os.path.exists(holder)
    with pytest.raises(RuntimeError):  # a run that fails releases it too
        with checkpoints.stage_lock(stage_dir):
            raise RuntimeError("boom")
    assert not os.path.exists(holder)
    with checkpoints.stage_lock(stage_dir):  # and the next run takes it
        pass


def test_other_flock_errors_still_refuse(monkeypatch, tmp_path):
    """EWOULDBLOCK (a live flock holder) is the flock path's refusal, not the fallback."""
    def busy(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
    monkeypatch.setattr(checkpoints.fcntl, "flock", busy)
    with pytest.raises(configs.ConfigError, match="another trainer is running"):
        with checkpoints.stage_lock(str(tmp_path / "vae")):
            pass
    assert not (tmp_path / "vae" / ".lock.holder").exists()


URLS = ("gs://bucket/run", "s3://bucket/run", "file:///tmp/run")


def assert_url_refused(r, cwd) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "URL" in lines[0] and "POSIX path" in lines[0], r.stderr
    assert os.listdir(cwd) == [], os.listdir(cwd)  # no local 'gs:' folder


@pytest.mark.parametrize("module, args", [
    ("train", ("--stage=vae", "--preset=smoke")),
    ("pipeline", ("--preset=smoke",)),
])
def test_url_workdir_is_refused_by_the_cli(module, args, tmp_path):
    r = run_module(module, f"--workdir={URLS[0]}", *args, cwd=str(tmp_path))
    assert_url_refused(r, tmp_path)


@pytest.mark.parametrize("module, args", [
    ("train", ("--stage=vae", "--preset=smoke")),
    ("pipeline", ("--preset=smoke",)),
    ("sample", ("--stage=ldm", "--out=grid.png")),
    ("evaluate", ()),
    ("benchmark", ("--stage=ldm",)),
    ("features", ("--out=c.npz",)),
])
@pytest.mark.parametrize("url", URLS)
def test_url_workdir_is_refused_by_every_entry_point(module, args, url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_url_refused(run_main(module, f"--workdir={url}", *args), tmp_path)


@pytest.mark.slow  # three smoke VAE runs: 2 minutes on 2 busy cores
def test_training_resumes_where_flock_is_refused(no_flock, tmp_path):
    """The issue's bar: on such a filesystem a stage trains, stops, resumes, and a second
    trainer is refused while one runs."""
    from ldm_jax import train  # pylint: disable=import-outside-toplevel
    c = configs.get_config("vae", "smoke")
    workdir, stage_dir = str(tmp_path), str(tmp_path / "vae")
    train.train_and_evaluate(c, workdir, stop_at_step=3)
    assert not os.path.exists(os.path.join(stage_dir, ".lock.holder"))
    with checkpoints.stage_lock(stage_dir):  # what a running trainer holds
        with pytest.raises(configs.ConfigError, match="another trainer is running"):
            train.train_and_evaluate(c, workdir)
    state = train.train_and_evaluate(c, workdir)
    assert int(state.step) == c.train.steps > 3
    assert checkpoints.stored_meta(stage_dir)["finished"]
