"""`ldm_jax.sample` refuses bad input in one line (exit 2, nothing written) and writes
what it was asked for."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from ldm_jax import configs, sample, train

from conftest import run_main, run_module
from test_bad_input import _one_line_exit_2


@pytest.mark.parametrize("args,message", [
    (["--seed=99999999999999999999"], "--seed must be"),
    (["--seed=-99999999999999999999"], "--seed must be"),
    (["--eta=nan"], "--eta must be in [0, 1], got nan"),
    (["--eta=1.5"], "--eta must be in [0, 1], got 1.5"),
    (["--eta=-0.1"], "--eta must be in [0, 1]"),
    (["--guidance=nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance=inf"], "--guidance must be a finite number >= 0"),
    (["--guidance=2"], "is unconditional; drop --guidance"),
    (["--label=\u00b2"], "--label must be a digit 0-9 or 'all'"),
    (["--label=\u0663"], "--label must be a digit 0-9 or 'all'"),
    (["--label=all", "--num=3"], "--num must be a multiple of 10, got 3"),
    (["--sampler=euler"], "flag --sampler=euler: value should be one of <ddpm|ddim|dpmpp2m>"),
    (["--sampler=ddim", "--eta_min_t=-1"], "--eta_min_t must be in [0, 50), the model's timesteps"),
    (["--sampler=ddim", "--eta_min_t=50"], "--eta_min_t must be in [0, 50)"),
    (["--eta_min_t=10"], "--eta_min_t is for the ddim sampler, not dpmpp2m"),  # smoke's sampler
    (["out=x.png"], "out=x.png"),
])
def test_sample_refuses(smoke_workdir, tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_main("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'g.png'}", *args)
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


def test_a_noise_interval_reaches_the_chain(smoke_workdir):
    """eta_min_t = 0 is the plain eta-1 chain, byte for byte; past every timestep it takes
    no fresh noise, the eta-0 chain; in between it is neither."""
    gen = sample.load_generator(smoke_workdir, "ldm")
    draw = lambda g, eta: sample.generate(g, 8, jax.random.key(3), "ddim", 10, eta,
                                          progress=False)
    with_min_t = lambda m: dataclasses.replace(gen, eta_min_t=m)
    plain, ode = draw(gen, 1.0), draw(gen, 0.0)
    np.testing.assert_array_equal(draw(with_min_t(0), 1.0), plain)
    np.testing.assert_array_equal(draw(with_min_t(gen.sched.num_timesteps), 1.0), ode)
    half = draw(with_min_t(gen.sched.num_timesteps // 2), 1.0)
    assert not np.array_equal(half, plain) and not np.array_equal(half, ode)


def test_the_configured_noise_interval_is_the_default(smoke_workdir, tmp_path):
    """A run trained with sample.eta_min_t samples with it unless --eta_min_t says
    otherwise: the default grid equals --eta_min_t=25's and differs from --eta_min_t=0's."""
    workdir = str(tmp_path / "w")
    shutil.copytree(os.path.join(smoke_workdir, "vae"), os.path.join(workdir, "vae"))
    c = configs.get_config("ldm", "smoke")
    c.sample.sampler, c.sample.steps, c.sample.eta, c.sample.eta_min_t = "ddim", 10, 1.0, 25
    train.train_and_evaluate(c, workdir)
    assert sample.load_generator(workdir, "ldm").eta_min_t == 25
    assert sample.load_generator(smoke_workdir, "ldm").eta_min_t == 0
    grids = {}
    for name, args in (("default", ()), ("25", ("--eta_min_t=25",)), ("0", ("--eta_min_t=0",))):
        out = tmp_path / f"{name}.png"
        r = run_main("sample", f"--workdir={workdir}", f"--out={out}", "--num=8", *args)
        assert r.returncode == 0, r.stderr
        with np.load(out.with_suffix(".npz"), allow_pickle=False) as z:
            grids[name] = z["images"]
    np.testing.assert_array_equal(grids["default"], grids["25"])
    assert not np.array_equal(grids["default"], grids["0"])


def test_sample_refuses_bad_places(smoke_workdir, tmp_path):
    (tmp_path / "adir.png").mkdir()
    r = run_main("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'adir.png'}")
    _one_line_exit_2(r, "adir.png")
    (tmp_path / "g.npz").mkdir()  # the .npz sibling of --out=g.png is a directory
    r = run_main("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'g.png'}")
    _one_line_exit_2(r, "g.npz")
    assert sorted(os.listdir(tmp_path)) == ["adir.png", "g.npz"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_main("sample", f"--workdir={afile}", f"--out={tmp_path / 'h.png'}")
    _one_line_exit_2(r, "afile")
    assert "train" not in r.stderr  # a file is not an untrained workdir


@pytest.mark.slow
def test_sample_uses_the_config_sampler_and_writes_both_files(smoke_workdir, tmp_path):
    out = tmp_path / "g.png"
    r = run_module("sample", f"--workdir={smoke_workdir}", "--stage=pixel", f"--out={out}",
                   "--num=4")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "dpmpp2m" in r.stderr  # the config's sample.sampler
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        assert z["images"].shape == (4, 28, 28) and z["images"].dtype == np.uint8
    assert out.stat().st_size > 0 and sorted(os.listdir(tmp_path)) == ["g.npz", "g.png"]
    r = run_module("sample", f"--workdir={smoke_workdir}", "--stage=ldm", "--sampler=dpmpp2m",
                   "--steps=4", "--num=4", f"--out={tmp_path / 'd.png'}")
    assert r.returncode == 0 and "dpmpp2m" in r.stderr, r.stderr[-1500:]
    with np.load(tmp_path / "d.npz", allow_pickle=False) as z:
        assert z["images"].shape == (4, 28, 28) and z["images"].std() > 0


@pytest.mark.slow  # CI margin (30 s); training's 1 = 4 devices stays in the default run
def test_samples_split_over_four_devices_equal_one_device(smoke_workdir, tmp_path):
    """sample splits its batch over the CPU devices (one per core by default): the same
    samples, noise included (eta 1), on one device and on four, up to float rounding."""
    images = []
    for devices in (1, 4):
        out = tmp_path / f"d{devices}.png"
        r = run_module("sample", f"--workdir={smoke_workdir}", "--stage=ldm", "--sampler=ddim",
                       "--steps=4", "--eta=1", "--num=8", f"--out={out}",
                       env={"LDM_JAX_CPU_DEVICES": str(devices), "XLA_FLAGS": ""})
        assert r.returncode == 0 and f"ddim, {devices} device" in r.stderr, r.stderr[-1500:]
        with np.load(tmp_path / f"d{devices}.npz", allow_pickle=False) as z:
            images.append(z["images"].astype(int))
    assert images[0].std() > 0
    assert np.abs(images[0] - images[1]).max() <= 1  # uint8 levels
