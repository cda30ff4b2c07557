"""The train loop: loss goes down, one compilation, resume == uninterrupted,
4 devices == 1 device, and bad input stops before anything is written."""

import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from ldm_jax import checkpoints, cli, configs, data, stages, train



@pytest.mark.parametrize("stage,overrides", [
    ("vae", {}), ("vae", {"autoencoder.reg": "vq", "loss.perceptual_weight": 1.0}),
    # The perceptual term alone: slow (CI margin); the vq row trains it too.
    pytest.param("vae", {"loss.perceptual_weight": 1.0}, marks=pytest.mark.slow),
    pytest.param("pixel", {}, marks=pytest.mark.slow),
    ("classifier", {}),
    pytest.param("pixel", {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr",
                           "diffusion.zero_terminal_snr": True}, marks=pytest.mark.slow),
    pytest.param("pixel", {"diffusion.prediction": "x0", "diffusion.loss_weighting": "min_snr"},
                 marks=pytest.mark.slow)])
def test_steps_lower_the_loss_on_a_fixed_batch(stage, overrides):
    c = configs.get_config(stage, "smoke")
    configs.apply_overrides(c, overrides)
    c.optim.lr = 1e-3
    task = stages.TASKS[stage](c, workdir=None)
    params, model_state = task.init(jax.random.key(0))
    tx = train.make_optimizer(c.optim, 100)
    state = train.TrainState.create(apply_fn=None, params=params, tx=tx,
                                    ema_params=jax.tree.map(jnp.copy, params),
                                    model_state=model_state)
    step = jax.jit(chex.assert_max_traces(
        lambda s, b, k: train.train_step(s, b, k, loss_fn=task.loss_fn, ema_decay=0.9), n=1))
    batch, key = task.get_batch(0), jax.random.key(1)
    losses = []
    for _ in range(8):
        state, m = step(state, batch, key)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    assert int(state.step) == 8
    chex.clear_trace_counter()


def test_ldm_stage_trains_on_vae_latents(smoke_workdir):
    lines = [json.loads(l) for l in open(os.path.join(smoke_workdir, "ldm", "metrics.jsonl"))]
    assert lines[-1]["step"] == 6 and all(np.isfinite(l["loss"]) for l in lines)
    _, cfg, meta = checkpoints.load_checkpoint(os.path.join(smoke_workdir, "ldm"))
    _, _, vae_meta = checkpoints.load_checkpoint(os.path.join(smoke_workdir, "vae"))
    assert meta["latent_shape"] == vae_meta["latent_shape"] == [7, 7, 4]
    assert meta["scale_factor"] == pytest.approx(1 / vae_meta["latent_std_sample"])
    assert meta["finished"] and cfg["stage"] == "ldm"


def test_nonfinite_step_is_skipped_not_applied():
    c = configs.get_config("vae", "smoke")
    task = stages.TASKS["vae"](c, workdir=None)
    params, _ = task.init(jax.random.key(0))
    state = train.TrainState.create(apply_fn=None, params=params,
                                    tx=train.make_optimizer(c.optim, 10),
                                    ema_params=jax.tree.map(jnp.copy, params))
    batch = task.get_batch(0)
    batch["image"] = batch["image"].at[0, 0, 0, 0].set(jnp.nan) if hasattr(batch["image"], "at") \
        else np.where(np.arange(batch["image"].size).reshape(batch["image"].shape) == 0, np.nan, batch["image"])
    step = jax.jit(functools.partial(train.train_step, loss_fn=task.loss_fn, ema_decay=0.9))
    new, m = step(state, batch, jax.random.key(0))
    assert not bool(m["finite"]) and int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)


def _final_params(workdir, stage="vae"):
    params, _, meta = checkpoints.load_checkpoint(os.path.join(workdir, stage))
    return params, meta


def test_resume_equals_uninterrupted(tmp_path, caplog):
    c = configs.get_config("vae", "smoke")
    # The step compiles once per run, across its log-interval resets (not again when the
    # committed outputs of the first step come back in).
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        train.train_and_evaluate(c, str(tmp_path / "full"))
    compiles = [r for r in caplog.records if "Compiling jit(_tally_step)" in r.getMessage()]
    assert c.train.steps > c.train.log_every and len(compiles) == 1, len(compiles)
    train.train_and_evaluate(c, str(tmp_path / "split"), stop_at_step=3)
    _, meta = _final_params(str(tmp_path / "split"))
    assert meta["step"] == 3 and not meta["finished"]
    train.train_and_evaluate(c, str(tmp_path / "split"))
    a, meta_a = _final_params(str(tmp_path / "full"))
    b, meta_b = _final_params(str(tmp_path / "split"))
    assert meta_a["step"] == meta_b["step"] == 6 and meta_b["finished"]
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-6)


def _train_in_subprocess(workdir, devices, *args, device_data="0"):
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "LDM_JAX_DEVICE_DATA": device_data}
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}", *args, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(l) for l in open(os.path.join(workdir, "vae", "metrics.jsonl"))]


def test_four_devices_match_one_device(tmp_path):
    one = _train_in_subprocess(str(tmp_path / "d1"), 1)
    four = _train_in_subprocess(str(tmp_path / "d4"), 4)
    np.testing.assert_allclose([l["loss"] for l in four], [l["loss"] for l in one], rtol=1e-5)
    a, meta_a = _final_params(str(tmp_path / "d1"))
    b, meta_b = _final_params(str(tmp_path / "d4"))
    assert (meta_a["devices"], meta_b["devices"]) == (1, 4)  # the mesh each was trained on
    chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)


DEVICE_PROBE = (
    "import jax; from ldm_jax import cli; cli.setup_jax(); "
    "print(jax.device_count(), cli.data_mesh(6).size, cli.data_mesh(16).size, cli.data_mesh().size)")


@pytest.mark.parametrize("env,expected", [
    ({"LDM_JAX_CPU_DEVICES": "4"}, "4 3 4 4"),  # the mesh: the most devices that split the batch
    ({"LDM_JAX_CPU_DEVICES": "4", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
     "3 3 2 3"),  # a count the user set in XLA_FLAGS is kept
])
def test_cpu_device_count_and_the_mesh_that_splits_the_batch(env, expected):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env | {"JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_cpu_device_count_exits_2_and_writes_nothing(tmp_path, value):
    workdir = tmp_path / "run"
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={workdir}",
                   env={"LDM_JAX_CPU_DEVICES": value})
    assert r.returncode == 2, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1 and "LDM_JAX_CPU_DEVICES must be" in r.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_cpu_devices_is_a_power_of_two_per_core(monkeypatch, cores, expected):
    monkeypatch.delenv("LDM_JAX_CPU_DEVICES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cli.cpu_devices() == expected


@pytest.mark.parametrize("args,message", [
    (["--stage=nope"], "unknown stage 'nope'"),
    (["--stage=vae", "--config.optim.lr=0"], "optim.lr must be positive"),
    (["--stage=vae", "--config.optim.nope=1"], "unknown config key"),
    (["--stage=vae", "--config.optim.lr=abc"], "could not convert"),
    (["--stage=vae", "--config.diffusion.timesteps=10"], "unknown config key 'diffusion.timesteps' for stage 'vae'"),
    (["--stage=vae", "--config.model.latent_ch=64"], "must be between 1 and 783"),
    (["--stage=ldm"], "no trained VAE"),
    (["--stage=pixel", "--config.model.ch_mult=(1,2,2,2,2,2)"], "shrinks to"),
    (["--stage=vae", "--preset=huge"], "unknown preset"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    r = run_module("train", "--preset=smoke", f"--workdir={workdir}", *args)
    assert r.returncode == 2, r.stderr[-1500:]
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not workdir.exists()


def test_changed_config_refuses_to_resume(tmp_path):
    c = configs.get_config("vae", "smoke")
    train.train_and_evaluate(c, str(tmp_path), stop_at_step=3)
    c2 = configs.get_config("vae", "smoke")
    c2.model.latent_ch = 2
    with pytest.raises(configs.ConfigError, match="model.latent_ch=4, not 2 .*set model.latent_ch=4 to resume"):
        train.train_and_evaluate(c2, str(tmp_path))
    c3 = configs.get_config("pixel", "smoke")
    os.rename(tmp_path / "vae", tmp_path / "pixel")
    with pytest.raises(configs.ConfigError, match="holds a 'vae' checkpoint"):
        train.train_and_evaluate(c3, str(tmp_path))


def test_config_from_stored_fills_fields_added_later():
    old = configs.get_config("ldm", "cpu-quick").to_dict()
    del old["model"]["conditioning"], old["model"]["label_dropout"]
    old["optim"]["lr"] = 3e-4
    del old["diffusion"]["prediction"], old["diffusion"]["loss_weighting"], old["model"]["text_conv"]
    c = checkpoints.config_from_stored(old)
    assert c.model.conditioning == "none" and c.model.label_dropout == 0.1
    # Written before the recipe options: it was an eps model with the uniform loss.
    assert c.diffusion.prediction == "eps" and c.diffusion.loss_weighting == "uniform"
    # ... and before the text encoder's character convolution (default 5 today).
    assert c.model.text_conv == 0 and configs.get_config("ldm").model.text_conv == 5
    assert c.optim.lr == 3e-4 and tuple(c.model.ch_mult) == (1, 2)
    configs.validate(c)
    # A student stored before sample.time_power samples at LCM's times, as it did then.
    student = configs.get_config("distill", "cpu-quick").to_dict()
    del student["sample"]["time_power"]
    assert checkpoints.config_from_stored(student).sample.time_power == 1.0
    assert configs.get_config("distill", "cpu-quick").sample.time_power != 1.0
    del student["sample"]["gamma"]  # ... and re-noises with fresh noise only
    assert checkpoints.config_from_stored(student).sample.gamma == 1.0


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_device_resident_data_equals_host_batches(tmp_path, monkeypatch):
    """The accelerator path (dataset on the device, each step draws and gathers its batch
    inside the jitted step) trains exactly what the CPU path (numpy batches) trains."""
    c = configs.get_config("vae", "smoke")
    monkeypatch.setenv("LDM_JAX_DEVICE_DATA", "0")
    host = train.train_and_evaluate(c, str(tmp_path / "host"))
    monkeypatch.setenv("LDM_JAX_DEVICE_DATA", "1")
    device = train.train_and_evaluate(c, str(tmp_path / "device"))
    chex.assert_trees_all_close(device.params, host.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(device.ema_params, host.ema_params, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # two more training subprocesses (~1 min on 2 cores)
def test_device_data_split_over_four_devices_matches_host_batches_on_one(tmp_path):
    """The dataset split by rows over 4 devices (510 examples: 2 rows of padding), each
    step's batch drawn and gathered inside the step, against host batches on 1 device."""
    one = _train_in_subprocess(str(tmp_path / "d1"), 1, "--config.data.max_examples=510")
    four = _train_in_subprocess(str(tmp_path / "d4"), 4, "--config.data.max_examples=510",
                                device_data="1")
    np.testing.assert_allclose([l["loss"] for l in four], [l["loss"] for l in one], rtol=1e-5)
    chex.assert_trees_all_close(_final_params(str(tmp_path / "d4"))[0],
                                _final_params(str(tmp_path / "d1"))[0], atol=1e-5, rtol=1e-5)


def test_gather_rows_of_a_row_split_dataset():
    """gather_rows against numpy indexing, with rows padded to the device count."""
    mesh = cli.data_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    y = np.arange(7, dtype=np.int32) * 10
    arrays = {"x": train.shard_rows(x, sharding), "y": train.shard_rows(y, sharding)}
    idx = np.array([6, 0, 3, 3, 5, 1, 2, 4], np.int32)
    out = jax.jit(lambda a, i: train.gather_rows(a, i, mesh))(arrays, jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(out["x"]), x[idx])
    np.testing.assert_array_equal(np.asarray(out["y"]), y[idx])


@pytest.mark.slow  # three smoke trainings (~30 s): CI margin
def test_a_run_keeps_the_shuffle_of_its_first_run(tmp_path, monkeypatch):
    """A run begun with numpy's shuffle (before the jax one) resumes with it."""
    c = configs.get_config("vae", "smoke")
    monkeypatch.setattr(data, "SHUFFLES", ("numpy", "jax"))  # new runs shuffle with numpy
    train.train_and_evaluate(c, str(tmp_path / "full"))
    train.train_and_evaluate(c, str(tmp_path / "split"), stop_at_step=3)
    monkeypatch.undo()  # the resume runs today's code
    train.train_and_evaluate(c, str(tmp_path / "split"))
    a, meta_a = _final_params(str(tmp_path / "full"))
    b, meta_b = _final_params(str(tmp_path / "split"))
    assert meta_a["shuffle"] == meta_b["shuffle"] == "numpy"
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-6)
