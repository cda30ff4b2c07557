"""Shared fixtures: one smoke-trained workdir (vae, ldm, pixel) for the whole session."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
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


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """A workdir with vae, ldm and pixel trained on the smoke preset (in this process)."""
    from ldm_jax import configs, train
    workdir = str(tmp_path_factory.mktemp("smoke"))
    for stage in ("vae", "ldm", "pixel"):
        train.train_and_evaluate(configs.get_config(stage, "smoke"), workdir)
    return workdir


@pytest.fixture(scope="session")
def text_workdir(smoke_workdir, tmp_path_factory):
    """smoke_workdir's VAE with a text-conditioned LDM trained on the smoke preset."""
    import shutil
    from ldm_jax import configs, train
    workdir = str(tmp_path_factory.mktemp("text"))
    shutil.copytree(os.path.join(smoke_workdir, "vae"), os.path.join(workdir, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.model.conditioning = "text"
    train.train_and_evaluate(c, workdir)
    return workdir
