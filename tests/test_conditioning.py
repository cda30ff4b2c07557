"""Class conditioning: label dropout, the guidance formula, the spatial transformer, and a
conditional smoke run that trains and samples every label."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import configs, diffusion, nets, sample, train


def test_label_dropout_share():
    labels = jnp.arange(200_000) % 10
    dropped = diffusion.drop_labels(jax.random.key(0), labels, 0.1, 10)
    share = float(jnp.mean(dropped == 10))
    assert abs(share - 0.1) < 0.003, share
    kept = dropped != 10
    np.testing.assert_array_equal(dropped[kept], labels[kept])
    assert bool(jnp.all(diffusion.drop_labels(jax.random.key(1), labels, 0.0, 10) == labels))


def _known_eps(x, t, y):
    """A fake denoiser whose output encodes its label: eps = x * (y + 1) + t."""
    scale = (y.astype(jnp.float32) + 1.0)[:, None, None, None]
    return x * scale + t.astype(jnp.float32)[:, None, None, None]


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_guidance_matches_formula_in_one_call(w):
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t, y, null = jnp.array([5, 6, 7]), jnp.array([1, 4, 9]), 10
    calls = []

    def eps_fn(x_, t_, y_):
        calls.append(x_.shape[0])
        return _known_eps(x_, t_, y_)
    got = diffusion.guided_eps_fn(eps_fn, y, null, w)(x, t)
    cond, uncond = _known_eps(x, t, y), _known_eps(x, t, jnp.full_like(y, null))
    np.testing.assert_allclose(got, (1 + w) * cond - w * uncond, rtol=1e-6, atol=1e-6)
    assert calls == [6]  # conditional and unconditional halves in one batched call
    if w == 0.0:
        np.testing.assert_allclose(got, cond, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["class", "crossattn"])
def test_conditional_unet_shapes_and_label_effect(mode):
    unet = nets.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, heads=2, groups=4, conditioning=mode)
    x, t = jnp.ones((2, 7, 7, 4)), jnp.array([3, 3])
    params = jax.jit(unet.init)(jax.random.key(0), x, t, jnp.array([0, 10]))["params"]
    # Zero-initialised output layers hide any label effect at init; perturb every leaf.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape)
                                for p, k in zip(leaves, keys)])
    apply = jax.jit(lambda y: unet.apply({"params": params}, x, t, y))
    out = lambda y: apply(jnp.array(y))
    assert out([7, 7]).shape == x.shape
    np.testing.assert_allclose(out([7, 7])[0], out([7, 7])[1], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out([7, 7]) - out([10, 10])).max()) > 1e-4  # null differs from 7
    assert float(jnp.abs(out([7, 7]) - out([3, 3])).max()) > 1e-4
    with pytest.raises(ValueError, match="needs labels"):
        unet.apply({"params": params}, x, t)


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_spatial_transformer_is_identity_at_init_and_reads_context():
    block = nets.SpatialTransformer(heads=2, groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 8))
    params = block.init(jax.random.key(2), x, ctx)["params"]
    np.testing.assert_allclose(block.apply({"params": params}, x, ctx), x)  # proj_out = 0
    params["proj_out"]["kernel"] = 0.1 * jnp.ones_like(params["proj_out"]["kernel"])
    a = block.apply({"params": params}, x, ctx)
    b = block.apply({"params": params}, x, ctx + 1.0)
    assert a.shape == x.shape and float(jnp.abs(a - b).max()) > 1e-4


@pytest.mark.parametrize("stage,mode", [
    pytest.param("ldm", "class", marks=pytest.mark.slow),  # 68 s: CI time margin
    pytest.param("pixel", "crossattn", marks=pytest.mark.slow)])
def test_conditional_smoke_run_samples_every_label(smoke_workdir, tmp_path, stage, mode):
    if stage == "ldm":  # the latent model trains on the smoke workdir's VAE
        shutil.copytree(os.path.join(smoke_workdir, "vae"), tmp_path / "vae")
    c = configs.get_config(stage, "smoke")
    c.model.conditioning = mode
    train.train_and_evaluate(c, str(tmp_path))
    gen = sample.load_generator(str(tmp_path), stage)
    labels = np.arange(10, dtype=np.int32)
    images = sample.generate(gen, 10, jax.random.key(0), "ddim", 3, labels=labels, guidance=2.0,
                             progress=False)
    uncond = sample.generate(gen, 10, jax.random.key(0), "ddim", 3, progress=False)
    assert images.shape == uncond.shape == (10, 28, 28) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - uncond.astype(int)).sum() > 0
    # w = 0 is plain conditional sampling: the same as guidance off for a labelled call.
    run = sample.sample_fn(gen, 10, "ddim", 3)
    cond = run(jax.random.key(5), labels, 0.0)
    net_fn = lambda x, t: gen.unet.apply({"params": gen.params}, x, t, jnp.asarray(labels))
    eps_fn = diffusion.eps_fn_from_model(net_fn, gen.sched, gen.config["diffusion"]["prediction"])
    plain = diffusion.ddim_sample(eps_fn, gen.sched, jax.random.key(5), (10, *gen.shape), 3, 0.0,
                                  bool(gen.config["diffusion"]["clip_x0"]))
    if gen.vae is not None:
        plain = gen.vae.apply(gen.vae_vars, plain / gen.scale_factor, method=nets.VAE.decode)
    np.testing.assert_allclose(cond, jnp.clip(plain, -1, 1), atol=1e-5)
