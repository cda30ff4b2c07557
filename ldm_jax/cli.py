"""What every entry point shares: flag parsing into a private FlagValues, config building
from --stage/--preset/--config.* , checks of paths and seeds the user typed, one-line
errors with exit status 2, JAX start-up."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
from typing import Callable, NoReturn

import jax
from absl import flags
from ml_collections import config_flags

from ldm_jax import configs


class UsageError(ValueError):
    """Bad input from the user; reported as one line, exit status 2."""


def fail(prog: str, msg: object) -> NoReturn:
    lines = str(msg).strip().splitlines() or [repr(msg)]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    sys.exit(2)


def parse_flags(prog: str, argv: list[str], define: Callable[[flags.FlagValues], None],
                with_config: bool = False, config_schema=None,
                config_help: str = "Override any config field: --config.optim.lr=3e-4 "
                                   "(see ldm_jax/configs.py).") -> flags.FlagValues:
    """Defines flags on a fresh FlagValues (no global state), parses argv, handles --help.
    with_config adds --config.* overrides of `config_schema` (default: every stage's
    fields, configs.union_config())."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("help", False, "Show this help and exit.", flag_values=fv, short_name="h")
    define(fv)
    try:
        if with_config:  # config_flags defines a flag per --config.* override in argv here
            config_flags.DEFINE_config_dict(
                "config", config_schema if config_schema is not None else configs.union_config(),
                config_help, flag_values=fv, lock_config=True, sys_argv=list(argv))
        leftover = fv(argv)[1:]
    except (AttributeError, KeyError) as e:
        fail(prog, f"unknown config key: {str(e).strip(chr(34) + chr(39))}")
    except flags.Error as e:
        fail(prog, e)
    if fv.help:
        print((sys.modules["__main__"].__doc__ or prog).strip() + "\n")
        print(fv.get_help())
        sys.exit(0)
    if leftover:  # absl returns what is not a flag; none of our commands takes positionals
        arg = leftover[0]
        hint = (f"did you mean --{arg.lstrip('-')}?" if "=" in arg
                else "this command takes only --flags")
        fail(prog, f"unexpected argument {arg!r}; {hint}")
    return fv


def build_config(fv: flags.FlagValues):
    """get_config(stage, preset) + the --config.* overrides the user typed, validated."""
    config = configs.get_config(fv.stage, fv.preset)
    configs.apply_overrides(config, config_flags.get_override_values(fv["config"]))
    configs.validate(config)
    return config


def require(fv: flags.FlagValues, *names: str) -> None:
    for name in names:
        if fv[name].value in (None, ""):
            raise UsageError(f"--{name} is required")


# A URL's scheme, as RFC 3986 spells it: a letter, then letters, digits, + - .
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def check_workdir(path: str, must_exist: bool = False, writable: bool = True) -> None:
    """A workdir must be a directory (or not exist yet, unless must_exist) and, when
    writable, be writable, or be creatable: its nearest existing parent a writable
    directory. Raises UsageError (one line). os.access: root passes the permission test
    on any directory, as it can write there. A URL (gs://, s3://, any scheme://) is
    refused: os.path would make it a local folder named 'gs:'."""
    scheme = URL_SCHEME.match(path)
    if scheme:
        raise UsageError(f"workdir {path} is a {scheme.group(1)}:// URL, which ldm_jax cannot "
                         "write to; use a POSIX path that every host sees (an NFS or Filestore "
                         "share, or a gcsfuse mount of the bucket)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"workdir {path} is a file, not a directory")
    if not os.path.exists(path):
        if must_exist:
            raise UsageError(f"workdir {path} does not exist")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"workdir {path} cannot be created: {parent} is a file")
        if writable and (why := unwritable_reason(parent)):
            raise UsageError(f"workdir {path} cannot be created: {parent} is not writable ({why})")
    elif writable and (why := unwritable_reason(path)):
        raise UsageError(f"workdir {path} is not writable ({why})")


def unwritable_reason(directory: str) -> str | None:
    """Why no file can be created in directory, or None if one can. It tries: os.access
    passes root everywhere, yet even root cannot write to /proc or a read-only mount.
    The probe is an unnamed temporary file, gone when closed."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as e:  # /proc answers ENOENT, which would read as a missing directory
        return "no file can be created there" if e.errno == errno.ENOENT else \
            (e.strerror or type(e).__name__)


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def check_seed(value: int | None, name: str = "--seed") -> None:
    """A seed must fit an int64 (what jax.random.key takes); None (unset) passes."""
    if value is not None and not INT64_MIN <= value <= INT64_MAX:
        raise UsageError(f"{name} must be within the int64 range [-2**63, 2**63 - 1], got {value}")


def check_out_path(path: str, suffix: str = ".png", siblings: tuple[str, ...] = (".npz",)) -> None:
    """An output file the command will write at `path` and, for each suffix in siblings,
    at path with its extension replaced by it (grid.png -> grid.npz): the parent directory
    exists and is writable, neither path is an existing directory, path ends in suffix."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; give a file name ending in {suffix}")
    if why := unwritable_reason(parent):
        raise UsageError(f"output directory {parent} is not writable ({why})")
    if not path.endswith(suffix):
        raise UsageError(f"--out must end in {suffix}, got {path}")
    for sib in siblings:
        other = os.path.splitext(path)[0] + sib
        if os.path.isdir(other):
            raise UsageError(f"{other}, written beside --out, is a directory")


def cpu_devices() -> int:
    """How many devices the CPU backend gets: one per core the process may use, rounded
    down to a power of two (so every preset's batch splits evenly) and at most 8;
    LDM_JAX_CPU_DEVICES=N overrides it. XLA:CPU runs a device's convolutions, their weight
    gradients above all, on about one core, so a data-parallel mesh of one device per core
    is what keeps the cores busy: on 2 cores the cpu-quick LDM step is 1.5x faster on two
    devices than on one (docs/results.md, "Cost")."""
    if "LDM_JAX_CPU_DEVICES" in os.environ:
        value = os.environ["LDM_JAX_CPU_DEVICES"]
        if not value.isascii() or not value.isdigit() or int(value) < 1:
            raise UsageError(f"LDM_JAX_CPU_DEVICES must be a whole number >= 1, got {value!r}")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 << (min(max(cores or 1, 1), 8).bit_length() - 1)


def data_mesh(batch_size: int | None = None) -> jax.sharding.Mesh:
    """The 1-D 'data' mesh over every device; in a one-process run with a batch_size, over
    the most devices that split it evenly (batch 48 on 32 devices: 24). Training and
    sampling split their batch over it and replicate the parameters."""
    devices = jax.devices()
    if batch_size and jax.process_count() == 1:
        devices = devices[:max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)]
    # Auto axes: XLA propagates the batch sharding; parameters stay replicated.
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def may_run_on_cpu() -> bool:
    """Whether JAX may start its CPU backend: JAX_PLATFORMS (jax.config.jax_platforms) is
    unset, or names cpu. Set to accelerators only (tpu, cuda, rocm, gpu), JAX starts no CPU
    backend, so a CPU device count has nothing to apply to."""
    named = {p.strip().lower() for p in (jax.config.jax_platforms or "").split(",")}
    return named <= {""} or "cpu" in named


def setup_jax() -> None:
    """Persistent compilation cache (start-up drops from tens of seconds to a few), and one
    CPU device per core (cpu_devices) unless XLA_FLAGS already sets the count. The count is
    jax_num_cpu_devices, which only JAX's CPU client reads: on a TPU or GPU host (JAX_PLATFORMS
    unset) the accelerator's devices stay as they are, and where JAX_PLATFORMS names
    accelerators only, LDM_JAX_CPU_DEVICES is neither read nor checked. Call it before
    anything touches a JAX backend."""
    cache = os.environ.get("LDM_JAX_CACHE", os.path.expanduser("~/.cache/ldm_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if may_run_on_cpu() and \
            "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices())
        except RuntimeError:  # a backend is already up (a caller in the same process): keep it
            pass


@contextlib.contextmanager
def atomic_output(path: str):
    """Yields an open binary file under a unique temporary name beside `path` (tempfile:
    two writers of one path never share it), renamed onto path when the block ends and
    removed if it raises, so path is always a whole file, old or new."""
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; outputs are read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def is_no_space(e: BaseException | None) -> bool:
    """Whether e, or an exception it was raised from, is ENOSPC (disk full), including the
    message forms of Orbax and tensorstore, which rewrap it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
                "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs: handled like Ctrl-C, exit status 143."""


def _raise_terminated(signum, frame):  # pylint: disable=unused-argument
    raise Terminated()  # no message: the entry points then print Ctrl-C's "interrupted"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM (kill, a scheduler's preemption) stops like Ctrl-C, with its
    one line, instead of killing silently with status 143; the old handler comes back after."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave the default
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupted_status(e: BaseException) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(e, Terminated) else 130
