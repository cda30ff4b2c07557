"""Shared fixtures: one smoke-trained workdir (vae, ldm, pixel) for the whole session."""

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import pytest

# Tests are dominated by XLA compile time, not run time: compile with LLVM's cheap
# pipeline (2x faster here). Set in the environment so every CLI subprocess and the
# notebook kernel compile the same way as this process (equality tests compare them).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One CPU device per test process (cli.setup_jax would give one per core): the two xdist
# workers already keep the cores busy, and one device compiles faster (the suite took 8:45
# with one device per core). Splitting over devices is tested explicitly: test_train.py and
# test_sample_cli.py run 1 against 4 devices.
os.environ.setdefault("LDM_JAX_CPU_DEVICES", "1")

import jax  # noqa: E402  (after the environment above)

from ldm_jax import cli  # noqa: E402

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session, shared with the CLI subprocesses
# (cli.setup_jax reads LDM_JAX_CACHE) and with the other xdist workers (they inherit the
# controller's environment, which made the directory): the same smoke step compiled again
# by a resumed, killed or second-process run, or by the other worker, is loaded, not
# rebuilt. Starts empty, so nothing stale.
if "LDM_JAX_TEST_CACHE" not in os.environ:
    os.environ["LDM_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="ldm_jax_test_xla_")
os.environ["LDM_JAX_CACHE"] = os.environ["LDM_JAX_TEST_CACHE"]
cli.setup_jax()


def run_module(module: str, *args: str, env: dict | None = None, cwd: str | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """python -m ldm_jax.<module> args..., captured."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", f"ldm_jax.{module}", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


def run_main(module: str, *args: str):
    """ldm_jax.<module>.main([prog, *args]) in this process -> .returncode, .stderr: the
    same exit status and stderr as `run_module`, without a Python start-up per call."""
    mod = importlib.import_module(f"ldm_jax.{module}")
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            mod.main([f"ldm_jax.{module}", *args])
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


SMOKE_STAGES = ("vae", "ldm", "pixel")
# The fixture's training in a child process (same code, same environment), then a DONE mark.
_BUILD = """import os, sys
from ldm_jax import cli, configs, train
cli.setup_jax()
for stage in sys.argv[2:]:
    train.train_and_evaluate(configs.get_config(stage, "smoke"), sys.argv[1])
open(os.path.join(os.path.dirname(sys.argv[1]), "DONE"), "w").close()
"""


def _xdist_controller(config) -> bool:
    return not hasattr(config, "workerinput") and (config.getoption("numprocesses", None) or 0) > 0


def pytest_configure(config):
    """Under xdist, the controller trains the smoke workdir once, in the background, while the
    workers run the tests that do not need it (ordered first): each worker used to train its own."""
    if not _xdist_controller(config) or "LDM_JAX_TEST_SMOKE" in os.environ:
        return
    build = tempfile.mkdtemp(prefix="ldm_jax_test_smoke_")
    with open(os.path.join(build, "build.log"), "w") as log:
        config._smoke_builder = subprocess.Popen(
            [sys.executable, "-c", _BUILD, os.path.join(build, "smoke"), *SMOKE_STAGES],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    os.environ["LDM_JAX_TEST_SMOKE"] = build  # the workers inherit it


def pytest_unconfigure(config):
    builder = getattr(config, "_smoke_builder", None)
    if builder is not None:
        if builder.poll() is None:  # a run that never needed it
            builder.kill()
            builder.wait()
        shutil.rmtree(os.environ.pop("LDM_JAX_TEST_SMOKE"), ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The tests that need no smoke workdir first, so the background build overlaps them."""
    items.sort(key=lambda item: "smoke_workdir" in getattr(item, "fixturenames", ()))


def _wait_for_build(build: str, timeout: float = 1200.0) -> str:
    """The controller's background build: its workdir once DONE, else fail with its log."""
    start = time.monotonic()
    while not os.path.exists(os.path.join(build, "DONE")):
        with open(os.path.join(build, "build.log")) as f:
            log = f.read()
        if "Traceback" in log or time.monotonic() - start > timeout:
            pytest.fail(f"the background smoke build failed or timed out:\n{log[-3000:]}")
        time.sleep(0.5)
    return os.path.join(build, "smoke")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """A workdir with vae, ldm and pixel trained on the smoke preset, this worker's own: a
    copy of the controller's background build under xdist, else trained here."""
    workdir = str(tmp_path_factory.mktemp("smoke"))
    if "LDM_JAX_TEST_SMOKE" in os.environ:
        shutil.copytree(_wait_for_build(os.environ["LDM_JAX_TEST_SMOKE"]), workdir,
                        dirs_exist_ok=True)
        return workdir
    from ldm_jax import configs, train
    for stage in SMOKE_STAGES:
        train.train_and_evaluate(configs.get_config(stage, "smoke"), workdir)
    return workdir


@pytest.fixture(scope="session")
def text_workdir(smoke_workdir, tmp_path_factory):
    """smoke_workdir's VAE with a text-conditioned LDM trained on the smoke preset."""
    from ldm_jax import configs, train
    workdir = str(tmp_path_factory.mktemp("text"))
    shutil.copytree(os.path.join(smoke_workdir, "vae"), os.path.join(workdir, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.model.conditioning = "text"
    train.train_and_evaluate(c, workdir)
    return workdir
