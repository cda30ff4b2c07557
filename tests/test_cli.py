"""The checks every entry point shares (ldm_jax.cli): each raises UsageError with one line."""

import errno
import os
import tempfile

import pytest
from absl import flags

from ldm_jax import cli

# Root may write anywhere: a directory without write permission is no test for it.
needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permissions")


def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(cli.UsageError, match=match) as e:
        fn(*args, **kwargs)
    assert len(str(e.value).splitlines()) == 1


def test_check_workdir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    cli.check_workdir(str(tmp_path))
    cli.check_workdir(str(tmp_path / "new" / "deeper"))  # created later, under tmp_path
    cli.check_workdir(str(tmp_path), must_exist=True, writable=False)
    _raises_one_line(f"workdir {f} is a file, not a directory", cli.check_workdir, str(f))
    _raises_one_line(f"workdir {f} is a file", cli.check_workdir, str(f), writable=False)
    _raises_one_line(f"workdir {f}/w/x cannot be created: {f} is a file",
                     cli.check_workdir, str(f / "w" / "x"))
    _raises_one_line(f"workdir {tmp_path}/nope does not exist",
                     cli.check_workdir, str(tmp_path / "nope"), must_exist=True)


@needs_non_root
def test_check_workdir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    cli.check_workdir(str(ro), writable=False)
    _raises_one_line(f"workdir {ro} is not writable", cli.check_workdir, str(ro))
    _raises_one_line(f"cannot be created: {ro} is not writable", cli.check_workdir, str(ro / "w"))


def test_check_seed():
    for ok in (None, 0, -1, 2**63 - 1, -2**63):
        cli.check_seed(ok)
    _raises_one_line(r"--seed must be within the int64 range .* got 1180591620717411303424",
                     cli.check_seed, 2**70)
    _raises_one_line(r"--sample_seed must be within", cli.check_seed, -2**63 - 1, "--sample_seed")


def test_check_out_path(tmp_path):
    cli.check_out_path(str(tmp_path / "g.png"))
    (tmp_path / "g.png").write_bytes(b"")  # an existing file is overwritten, as before
    cli.check_out_path(str(tmp_path / "g.png"))
    _raises_one_line(f"output directory {tmp_path}/no does not exist",
                     cli.check_out_path, str(tmp_path / "no" / "g.png"))
    (tmp_path / "d.png").mkdir()
    _raises_one_line(f"--out {tmp_path}/d.png is a directory", cli.check_out_path,
                     str(tmp_path / "d.png"))
    _raises_one_line(f"--out must end in .png, got {tmp_path}/g.jpg", cli.check_out_path,
                     str(tmp_path / "g.jpg"))
    (tmp_path / "s.npz").mkdir()
    _raises_one_line(f"{tmp_path}/s.npz, written beside --out, is a directory",
                     cli.check_out_path, str(tmp_path / "s.png"))
    cli.check_out_path(str(tmp_path / "s.png"), siblings=())
    cli.check_out_path(str(tmp_path / "f.npz"), suffix=".npz", siblings=())


@needs_non_root
def test_check_out_path_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    _raises_one_line(f"output directory {ro} is not writable", cli.check_out_path,
                     str(ro / "g.png"))


@pytest.mark.parametrize("argv,message", [
    (["p", "out=x.png"], "p: error: unexpected argument 'out=x.png'; did you mean --out=x.png?"),
    (["p", "-out=x.png"], None),  # absl takes one dash as a flag too
    (["p", "--out=a", "x"], "p: error: unexpected argument 'x'; this command takes only --flags"),
    (["p", "--", "--out=b"], "p: error: unexpected argument '--out=b'; did you mean --out=b?"),
])
def test_parse_flags_refuses_positional_arguments(capsys, argv, message):
    def define(fv):
        flags.DEFINE_string("out", "samples.png", "", flag_values=fv)
    if message is None:
        assert cli.parse_flags("p", argv, define).out == "x.png"
        return
    with pytest.raises(SystemExit) as e:
        cli.parse_flags("p", argv, define)
    assert e.value.code == 2 and capsys.readouterr().err == message + "\n"


def test_read_only_paths_where_root_runs_the_tests(tmp_path, monkeypatch):
    """The same refusals where root runs the tests: no file can be created under ro/."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_temporary_file = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
        if str(dir).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    cli.check_workdir(str(ro), writable=False)
    _raises_one_line(f"workdir {ro} is not writable \\(Permission denied\\)",
                     cli.check_workdir, str(ro))
    _raises_one_line(f"cannot be created: {ro} is not writable", cli.check_workdir, str(ro / "w"))
    _raises_one_line(f"output directory {ro} is not writable", cli.check_out_path,
                     str(ro / "g.png"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
def test_a_directory_not_even_root_can_write_to():
    """os.access passes root on /proc, where no file can be created: the checks try."""
    _raises_one_line("output directory /proc is not writable", cli.check_out_path, "/proc/g.png")
    _raises_one_line("workdir /proc/w cannot be created: /proc is not writable",
                     cli.check_workdir, "/proc/w")
    assert cli.unwritable_reason("/proc") and cli.unwritable_reason(os.getcwd()) is None
