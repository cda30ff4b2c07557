"""What differs on a TPU, checked on 8 CPU devices, the layout of a TPU v2-8 or v3-8
(issue 30): the full preset's batches split over 1, 4 and 8 devices; the accelerator's
data path (the dataset on the devices, LDM_JAX_DEVICE_DATA=1) and bfloat16 train on 8
devices what the host path trains on 1; sample and evaluate split their batches over 8
devices and draw what 1 device draws; the CPU device count reaches every entry point and
is never set for a TPU or GPU backend.

The 8-device runs are subprocesses (this process has one CPU device, conftest.py); each
compiles its step on 2 cores, so they are in `-m slow`."""

import inspect
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from absl import flags

from conftest import ROOT, run_module
from ldm_jax import checkpoints, cli, configs, evaluate, sample

# A TPU v2-8 / v3-8: 8 devices in one process. XLA_FLAGS empty: no count from elsewhere.
EIGHT = {"LDM_JAX_CPU_DEVICES": "8", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
ONE = dict(EIGHT, LDM_JAX_CPU_DEVICES="1")


@pytest.mark.parametrize("stage", configs.STAGES)
def test_every_stage_of_the_full_preset_splits_over_1_4_and_8_devices(stage):
    """Every stage, the classifier too (test_colab.py checks vae, ldm and pixel): a batch
    that 8 does not divide trains on fewer devices (cli.data_mesh), silently."""
    batch = configs.get_config(stage, "full").data.batch_size
    assert all(batch % n == 0 for n in (1, 4, 8)), (stage, batch)


def test_the_sampling_batches_of_the_full_preset_split_over_1_4_and_8_devices():
    """What sample and evaluate split over the devices (sample.sample_mesh): the sample
    CLI's --batch_size, generate's batch and evaluate's full-preset batch."""
    fv = flags.FlagValues()
    sample.define_flags(fv)
    generate_batch = inspect.signature(sample.generate).parameters["batch_size"].default
    batches = {"sample --batch_size": fv["batch_size"].default, "generate": generate_batch,
               "evaluate --preset=full": min(generate_batch, evaluate.PLAN["full"][0])}
    assert all(b % n == 0 for b in batches.values() for n in (1, 4, 8)), batches


# --- The CPU device count: set for the CPU backend only, and before any backend is up ---

@pytest.fixture
def set_jax_platforms():
    """Sets jax.config.jax_platforms (what JAX_PLATFORMS sets when JAX is imported) for one
    test and puts it back after. This process's CPU backend is started first: JAX does not
    read the setting again, so nothing starts on the named platform."""
    jax.devices()
    update, before = jax.config.update, jax.config.jax_platforms
    yield lambda value: update("jax_platforms", value)
    update("jax_platforms", before)


@pytest.mark.parametrize("platforms,cpu", [
    (None, True), ("cpu", True), ("cuda,cpu", True),  # JAX may start its CPU backend
    ("tpu", False), ("cuda", False), ("gpu", False), ("rocm", False), ("TPU", False)])
def test_the_cpu_device_count_is_set_for_the_cpu_backend_only(
        monkeypatch, set_jax_platforms, platforms, cpu):
    """The count is jax_num_cpu_devices, which only JAX's CPU client reads, never XLA_FLAGS
    (which every backend's XLA reads); where JAX_PLATFORMS names accelerators only, it is
    not set, and LDM_JAX_CPU_DEVICES, even a bad one, does not stop a TPU or GPU run."""
    set_jax_platforms(platforms)
    monkeypatch.setenv("LDM_JAX_CPU_DEVICES", "8")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    updates = {}
    monkeypatch.setattr(jax.config, "update", updates.__setitem__)  # record, apply nothing
    cli.setup_jax()
    assert "jax_compilation_cache_dir" in updates  # the rest of setup_jax ran
    assert updates.get("jax_num_cpu_devices") == (8 if cpu else None), updates
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("LDM_JAX_CPU_DEVICES", "0")
    if cpu:
        with pytest.raises(cli.UsageError, match="LDM_JAX_CPU_DEVICES must be"):
            cli.setup_jax()
    else:
        cli.setup_jax()
        assert "jax_num_cpu_devices" not in updates


# Each entry point's main, stopped where it calls cli.setup_jax: was a JAX backend up by
# then? Then jax_num_cpu_devices came too late and the run kept one CPU device (setup_jax
# keeps a backend that is up). In one process, in order; an entry point after one that
# started a backend cannot be judged (None).
SETUP_PROBE = """
import importlib, json, sys
from jax._src import xla_bridge
from ldm_jax import cli

class Stop(Exception):
    pass

def stop():
    raise Stop

cli.setup_jax = stop
seen = {}
for name, *args in json.loads(sys.argv[1]):
    if xla_bridge.backends_are_initialized():
        seen[name] = None
        continue
    try:
        importlib.import_module(f"ldm_jax.{name}").main([name, *args])
        seen[name] = "returned"
    except Stop:
        seen[name] = xla_bridge.backends_are_initialized()
    except SystemExit as e:
        seen[name] = f"exit {e.code}"
print(json.dumps(seen))
"""

ENTRY_POINTS = ("train", "sample", "benchmark", "pipeline", "evaluate")


@pytest.fixture(scope="module")
def setup_order(tmp_path_factory):
    """{entry point: whether a JAX backend was up when it called cli.setup_jax}."""
    tmp = tmp_path_factory.mktemp("setup_order")
    empty = str(tmp / "empty")  # exists: the commands that read a workdir check that first
    os.makedirs(empty)
    commands = [
        ["train", "--stage=vae", "--preset=smoke", f"--workdir={tmp / 'new'}"],
        ["sample", f"--workdir={empty}", f"--out={tmp / 'g.png'}"],
        ["benchmark", f"--workdir={empty}", "--stage=ldm", "--what=generate"],
        ["pipeline", "--preset=smoke", f"--workdir={tmp / 'new'}"],
        ["evaluate", "--preset=smoke", f"--workdir={empty}"],  # last: it starts a backend
    ]
    assert [c[0] for c in commands] == list(ENTRY_POINTS)
    r = subprocess.run([sys.executable, "-c", SETUP_PROBE, json.dumps(commands)],
                       capture_output=True, text=True, env=dict(os.environ, **EIGHT),
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_entry_point_sets_the_device_count_before_a_backend_is_up(setup_order,
                                                                        entry_point):
    assert setup_order[entry_point] is False, setup_order


# --- 8 devices against 1: training (the accelerator's data path, bfloat16) ---

def _train_ldm(vae_workdir, workdir, env, *overrides):
    """The smoke LDM trained by `python -m ldm_jax.train` on smoke_workdir's VAE, with 509
    examples: 3 rows of padding when the dataset is split over 8 devices. Returns the
    metrics.jsonl rows and stderr (JAX_LOG_COMPILES: which step function compiled)."""
    os.makedirs(workdir)
    shutil.copytree(os.path.join(vae_workdir, "vae"), os.path.join(workdir, "vae"))
    r = run_module("train", "--stage=ldm", "--preset=smoke", f"--workdir={workdir}",
                   "--config.data.max_examples=509", *overrides,
                   env=dict(env, JAX_LOG_COMPILES="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(os.path.join(workdir, "ldm", "metrics.jsonl"))]
    return rows, r.stderr


def _checkpoint(workdir, step=None):
    """(EMA parameters, config, meta) of workdir/ldm at step (default: the last)."""
    return checkpoints.load_checkpoint(os.path.join(workdir, "ldm"), step)


def _device_and_host_runs(smoke_workdir, tmp_path, *overrides):
    """(8 devices, device data) and (1 device, host batches): rows, stderr, checkpoint."""
    eight = _train_ldm(smoke_workdir, str(tmp_path / "d8"),
                       dict(EIGHT, LDM_JAX_DEVICE_DATA="1"), *overrides)
    one = _train_ldm(smoke_workdir, str(tmp_path / "d1"), dict(ONE, LDM_JAX_DEVICE_DATA="0"),
                     *overrides)
    # The accelerator's path ran on 8 devices (its batch drawn inside the step), the host
    # path on 1.
    assert "_device_data_step" in eight[1] and "jit(_tally_step)" not in eight[1]
    assert "jit(_tally_step)" in one[1] and "_device_data_step" not in one[1]
    a, b = _checkpoint(str(tmp_path / "d8")), _checkpoint(str(tmp_path / "d1"))
    assert (a[2]["devices"], b[2]["devices"]) == (8, 1)
    assert a[2]["step"] == b[2]["step"] == 6
    return eight[0], one[0], a, b


@pytest.mark.slow  # two smoke LDM trainings in subprocesses: ~2 min on 2 cores
def test_device_data_on_8_devices_trains_what_host_batches_train_on_1(smoke_workdir, tmp_path):
    """The path a TPU takes (LDM_JAX_DEVICE_DATA auto is on off the CPU): the LDM's
    latents (mean and std) split by rows over 8 devices, each step's batch drawn and
    gathered inside the step. The same batches, keys and updates as host batches on 1
    device, up to float32 rounding (stages.batcher, train.gather_rows)."""
    eight, one, a, b = _device_and_host_runs(smoke_workdir, tmp_path)
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], rtol=1e-5)
    chex.assert_trees_all_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def _distance(x, y) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(p, np.float64) - np.asarray(q, np.float64)) ** 2)
                             for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))))


@pytest.mark.slow  # two bfloat16 smoke LDM trainings in subprocesses: ~2 min on 2 cores
def test_bfloat16_on_8_devices_trains_what_it_trains_on_1(smoke_workdir, tmp_path):
    """model.dtype=bfloat16 on the accelerator's path (8 devices, device data) against
    bfloat16 on 1 device: finite losses, and the two runs apart by a small share of what
    the last 3 steps moved the parameters. Not float32's 1e-5: the gradient's sums over
    the batch round to bfloat16 per device, and Adam's normalised step turns the rounding
    of near-zero gradients into whole steps (3.5 % measured; float32's 0.0004 %)."""
    eight, one, a, b = _device_and_host_runs(smoke_workdir, tmp_path,
                                             "--config.model.dtype=bfloat16")
    assert a[1]["model"]["dtype"] == b[1]["model"]["dtype"] == "bfloat16"
    for rows in (eight, one):
        assert all(np.isfinite(r["loss"]) and r["skipped_nonfinite"] == 0 for r in rows), rows
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], rtol=1e-3)
    moved = _distance(b[0], _checkpoint(str(tmp_path / "d1"), step=3)[0])
    assert moved > 0
    assert _distance(a[0], b[0]) < 0.1 * moved, (_distance(a[0], b[0]), moved)


# --- 8 devices against 1: sample and evaluate ---

# On 8 devices: evaluate.evaluate (the notebook's call, after cli.setup_jax) with every
# batch that sample.sample_fn returns recorded by how many devices hold it, and one
# sample_fn batch in float32 (eta 1: noise at every step).
SAMPLE_PROBE = """
import json, sys
import jax, numpy as np
from ldm_jax import cli
cli.setup_jax()
from ldm_jax import evaluate, sample
workdir, out = sys.argv[1:3]
split, sample_fn = [], sample.sample_fn

def recording(*args, **kwargs):
    call = sample_fn(*args, **kwargs)
    def counted(*a, **k):
        x = call(*a, **k)
        split.append(len(x.sharding.device_set))
        return x
    return counted

sample.sample_fn = recording
evaluate.evaluate(workdir, "smoke", cost=False, sweeps=False, eta=1.0)
np.save(out, np.asarray(sample.sample_fn(sample.load_generator(workdir, "ldm"), 128, "ddim", 5,
                                         eta=1.0)(jax.random.key(7))))
print(json.dumps({"devices": jax.device_count(), "split": split}))
"""


@pytest.mark.slow  # an 8-device evaluate in a subprocess and a 1-device one here: ~2.5 min
def test_sample_and_evaluate_on_8_devices_draw_what_1_device_draws(smoke_workdir, tmp_path):
    """evaluate's quality samples and a sample_fn batch, split over 8 devices (16 samples
    each), against 1 device, same seeds: the same images up to float32 rounding."""
    workdirs = {}
    for n in (1, 8):
        workdirs[n] = str(tmp_path / f"d{n}")
        for stage in ("vae", "ldm"):  # evaluate writes workdir/eval: a copy of each
            shutil.copytree(os.path.join(smoke_workdir, stage), os.path.join(workdirs[n], stage))
    r = subprocess.run([sys.executable, "-c", SAMPLE_PROBE, workdirs[8], str(tmp_path / "x8.npy")],
                       capture_output=True, text=True, env=dict(os.environ, **EIGHT), cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["devices"] == 8 and probe["split"] and set(probe["split"]) == {8}, probe
    assert jax.device_count() == 1  # this process: conftest.py
    evaluate.evaluate(workdirs[1], "smoke", cost=False, sweeps=False, eta=1.0)
    x1 = np.asarray(sample.sample_fn(sample.load_generator(workdirs[1], "ldm"), 128, "ddim", 5,
                                     eta=1.0)(jax.random.key(7)))
    x8 = np.load(tmp_path / "x8.npy")
    assert x1.std() > 0.1
    np.testing.assert_allclose(x8, x1, atol=1e-5, rtol=0)
    images = {}
    for n, workdir in workdirs.items():
        with np.load(os.path.join(workdir, "eval", "ldm_samples.npz"), allow_pickle=False) as z:
            images[n] = z["images"].astype(int)
    assert images[1].shape == (evaluate.PLAN["smoke"][0], 28, 28) and images[1].std() > 0
    assert np.abs(images[8] - images[1]).max() <= 1  # uint8 levels: a rounding at most
    scores = [json.load(open(os.path.join(w, "eval", "metrics.json")))["quality"]["ldm"]
              for w in workdirs.values()]
    assert scores[0].keys() == scores[1].keys()
    for k in scores[0]:  # FID, PRDC, the class histogram and its KL
        np.testing.assert_allclose(scores[1][k], scores[0][k], rtol=1e-3, atol=1e-6, err_msg=k)
