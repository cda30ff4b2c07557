import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import configs, models, nets


def n_params(p):
    return sum(x.size for x in jax.tree.leaves(p))


@pytest.mark.parametrize("reg", ["kl", "vq"])
@pytest.mark.parametrize("channels,side", [  # the other sizes in -m slow (CI margin)
    ((16, 32), 7), pytest.param((32, 64), 7, marks=pytest.mark.slow),
    pytest.param((8, 16, 32), 4, marks=pytest.mark.slow)])
def test_vae_shapes(channels, side, reg):
    vae = nets.VAE(channels=channels, latent_ch=2, num_res_blocks=0, groups=4, reg=reg,
                   num_codes=16)
    x = jnp.zeros((3, 28, 28, 1))
    key = jax.random.key(0)
    variables = vae.init(key, x, key)
    assert set(variables) == ({"params"} if reg == "kl" else {"params", "vq"})
    recon, info = vae.apply(variables, x, key)
    chex.assert_shape(recon, (3, 28, 28, 1))
    mean, logvar = vae.apply(variables, x, method=nets.VAE.encode)
    chex.assert_shape([mean, logvar], (3, side, side, 2))
    if reg == "kl":
        chex.assert_shape([info["mean"], info["logvar"]], (3, side, side, 2))
    else:  # a point-mass posterior: std exp(logvar / 2) is exactly 0
        assert float(jnp.max(jnp.exp(0.5 * logvar))) == 0.0
        chex.assert_shape(variables["vq"]["quantizer"]["codebook"], (16, 2))
        chex.assert_shape(info["index"], (3, side, side))
    z = vae.apply(variables, jnp.zeros((5, side, side, 2)), method=nets.VAE.decode)
    chex.assert_shape(z, (5, 28, 28, 1))


@pytest.mark.parametrize("decoder_blocks", [-1, 0, 2])
def test_decoder_res_blocks_deepen_the_decoder_only(decoder_blocks):
    """model.decoder_res_blocks sets the decoder's blocks per level apart from the encoder's;
    a stored config without the field (< 0) builds the decoder it always had."""
    c = configs.get_config("vae", "smoke")
    c.model.num_res_blocks = 1
    stored = c.to_dict()
    if decoder_blocks >= 0:
        stored["model"]["decoder_res_blocks"] = decoder_blocks
    else:
        del stored["model"]["decoder_res_blocks"]
    x, key = jnp.zeros((1, 28, 28, 1)), jax.random.key(0)
    params = jax.eval_shape(models.build_vae(stored).init, key, x, key)["params"]
    blocks = lambda part: sum(name.startswith("ResBlock") for name in params[part])
    levels = len(c.model.channels)
    assert blocks("encoder") == 1 + levels  # one at the latent, one per level
    assert blocks("decoder") == 1 + levels * (1 if decoder_blocks < 0 else decoder_blocks)


@pytest.mark.parametrize("stage,shape", [  # the other shapes in -m slow (CI margin)
    ("ldm", (2, 7, 7, 4)), pytest.param("pixel", (2, 28, 28, 1), marks=pytest.mark.slow),
    pytest.param("ldm", (2, 4, 4, 4), marks=pytest.mark.slow)])
def test_unet_shapes_and_zero_init_output(stage, shape):
    c = configs.get_config(stage, "smoke")
    unet = models.build_unet(c.model)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.array([0, 999])
    params = unet.init(jax.random.key(0), x, t)["params"]
    out = unet.apply({"params": params}, x, t)
    chex.assert_shape(out, shape)
    np.testing.assert_array_equal(out, 0.0)  # the last conv starts at zero


def test_parameter_counts():
    """Pinned counts of the cpu-quick presets: a changed architecture must be deliberate.
    (jax.eval_shape: shapes only, nothing is compiled or run.)"""
    counts = {}
    key, t = jax.random.key(0), jnp.zeros((1,), jnp.int32)
    for stage, shape in (("ldm", (1, 7, 7, 4)), ("pixel", (1, 28, 28, 1))):
        unet = models.build_unet(configs.get_config(stage, "cpu-quick").model)
        counts[stage] = n_params(jax.eval_shape(unet.init, key, jnp.zeros(shape), t)["params"])
    x = jnp.zeros((1, 28, 28, 1))
    for reg in ("kl", "vq"):
        c = configs.get_config("vae", "cpu-quick")
        c.autoencoder.reg = reg
        variables = jax.eval_shape(models.build_vae(c).init, key, x, key)
        counts[f"vae-{reg}"] = n_params(variables["params"])
        if reg == "vq":
            counts["vq-codebook"] = n_params(variables["vq"]["quantizer"]["codebook"])
    counts["classifier"] = n_params(jax.eval_shape(nets.Classifier().init, key, x)["params"])
    assert counts == {"ldm": 686_308, "pixel": 1_096_033, "vae-kl": 59_929,
                      "vae-vq": 59_797, "vq-codebook": 256 * 4, "classifier": 467_818}


def test_timestep_embedding():
    """Every row, t = 0 and t != 0, against the float64 formula of Vaswani et al. (2017):
    [cos(t w_i), sin(t w_i)] with w_i = 10000^(-i / (dim / 2)), i < dim / 2."""
    t = np.array([0, 1, 10, 37, 999])
    e = nets.timestep_embedding(jnp.asarray(t), 8)
    chex.assert_shape(e, (5, 8))
    freqs = np.array([1.0, 0.1, 0.01, 0.001])  # 10000 ** (-i / 4), written out
    args = t[:, None].astype(np.float64) * freqs[None]
    np.testing.assert_allclose(np.asarray(e, np.float64),
                               np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-5)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_classifier_features():
    clf = nets.Classifier()
    x = jnp.zeros((4, 28, 28, 1))
    params = clf.init(jax.random.key(0), x)["params"]
    chex.assert_shape(clf.apply({"params": params}, x), (4, 10))
    chex.assert_shape(clf.apply({"params": params}, x, method=nets.Classifier.features), (4, 128))


def _group_norm_f64(x, scale, bias, groups, eps=1e-6):
    """Float64 numpy GroupNorm: two-pass variance over (H, W, channels of the group)."""
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("shape,groups", [((3, 7, 7, 16), 8), ((2, 4, 4, 32), 4),
                                          ((2, 28, 28, 8), 8)])
def test_group_norm_matches_float64_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    scale = rng.standard_normal(shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    params = {"params": {"scale": scale, "bias": bias}}
    ours = np.asarray(nets.GroupNorm(groups).apply(params, x))
    np.testing.assert_allclose(ours, _group_norm_f64(x, scale, bias, groups), atol=2e-5)
    import flax.linen as nn
    theirs = nn.GroupNorm(groups).apply(params, x)  # the same parameter names and function
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=2e-5)
    # Gradients too (the point of writing it by hand is a cheaper backward pass).
    g = lambda f: jax.grad(lambda x, p: jnp.sum(jnp.sin(f.apply(p, x))), argnums=(0, 1))(x, params)
    chex.assert_trees_all_close(g(nets.GroupNorm(groups)), g(nn.GroupNorm(groups)), atol=2e-4)
    # bf16 input: float32 statistics, bf16 output.
    y16 = nets.GroupNorm(groups).apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ours, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("side,size", [(7, 14), (4, 7), (14, 28), (2, 4)])
def test_upsample_is_nearest_resize(side, size):
    x = jax.random.normal(jax.random.key(0), (2, side, side, 3))
    np.testing.assert_array_equal(
        np.asarray(nets.upsample_to(x, size)),
        np.asarray(jax.image.resize(x, (2, size, size, 3), "nearest")))


def _bf16_setup():
    """A smoke LDM U-Net with perturbed parameters, and its configs at float32 and bfloat16."""
    c = configs.get_config("ldm", "smoke")
    unet = models.build_unet(c.model)
    x = jax.random.normal(jax.random.key(0), (4, 7, 7, 4))
    t = jnp.array([1, 10, 25, 49])
    # Away from the zero-initialised output layer; jitted (eager init takes a minute).
    params = jax.jit(lambda k: jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(k, p.shape), unet.init(k, x, t)["params"]))(
            jax.random.key(1))
    c16 = configs.get_config("ldm", "smoke")
    c16.model.dtype = "bfloat16"
    configs.validate(c16)
    return unet, params, x, t, c, c16


def test_bfloat16_compute():
    """model.dtype=bfloat16: every convolution and matmul of the U-Net runs in bfloat16 (its
    output's closeness to float32 compute: the slow test below)."""
    c = configs.get_config("ldm", "smoke")
    c.model.dtype = "bfloat16"
    unet = models.build_unet(c.model)
    x, t = jnp.zeros((4, 7, 7, 4)), jnp.zeros((4,), jnp.int32)
    params = jax.eval_shape(unet.init, jax.random.key(1), x, t)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p, x, t: models.unet_fn(unet, c.model, p)(x, t))(
        params, x, t))
    convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
    assert convs and all("bf16" in line and "f32[" not in line.split("=")[0] for line in convs)
    assert "dot_general" in jaxpr and not any(
        "dot_general" in line and line.split("=")[0].count("f32[") for line in jaxpr.splitlines())


@pytest.mark.slow  # ~30 s of bfloat16 compilation on 2 cores
def test_bfloat16_train_step_keeps_float32_state():
    """Gradients through the bfloat16 casts arrive in float32, point the same way as float32
    compute, and a train step keeps parameters, EMA and Adam moments in float32."""
    from ldm_jax import train
    unet, params, x, t, c, c16 = _bf16_setup()
    f32, bf16 = models.unet_fn(unet, c.model, params), models.unet_fn(unet, c16.model, params)
    y32, y16 = jax.jit(f32)(x, t), jax.jit(bf16)(x, t)
    assert y16.dtype == jnp.float32
    assert float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32)) < 0.05

    def loss(p, cfg):
        return jnp.mean(jnp.square(models.unet_fn(unet, cfg, p)(x, t) - x))
    g32 = jax.jit(jax.grad(lambda p: loss(p, c.model)))(params)
    g16 = jax.jit(jax.grad(lambda p: loss(p, c16.model)))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    cos = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16))) / (
        optax_norm(g32) * optax_norm(g16))
    assert float(cos) > 0.98
    task_state = train.TrainState.create(apply_fn=None, params=params, ema_params=params,
                                         tx=train.make_optimizer(c16.optim, 10))

    def loss_fn(p, model_state, batch, key):
        return loss(p, c16.model), ({}, model_state)
    new, metrics = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn, ema_decay=0.9))(
        task_state, {}, jax.random.key(3))
    assert bool(metrics["finite"])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((new.params, new.opt_state,
                                                                 new.ema_params))
               if jnp.issubdtype(a.dtype, jnp.floating))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree)))
