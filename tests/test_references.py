"""The jitted train step against float64 numpy references: the EMA parameters after k steps."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax import train

K = 5  # optimizer steps


def quadratic_loss(params, model_state, batch, key):
    """0.5 ||w - target||^2, in the (params, model_state, batch, key) -> (loss, (metrics,
    model_state)) form the train step takes."""
    del key
    loss = 0.5 * jnp.sum(jnp.square(params["w"] - batch["target"]))
    return loss, ({"half_sq_err": loss}, model_state)


# The decay of each of the K updates, written out rather than computed: TF's
# ExponentialMovingAverage with num_updates = the updates made before this one,
# min(decay, (1 + n) / (10 + n)): 1/10, 2/11, 3/12, 4/13, 5/14 (0.2 caps it from n = 2).
DECAYS = {0.2: [0.1, 2 / 11, 0.2, 0.2, 0.2], 0.999: [0.1, 2 / 11, 0.25, 4 / 13, 5 / 14]}


def ema_reference(params_by_step: list[np.ndarray], decay: float) -> np.ndarray:
    """ema_0 = params_0; ema_{s+1} = d_s ema_s + (1 - d_s) params_{s+1} with d_s from the
    table DECAYS; float64."""
    ema = np.asarray(params_by_step[0], np.float64)
    for d, p in zip(DECAYS[decay], params_by_step[1:], strict=True):
        ema = d * ema + (1.0 - d) * np.asarray(p, np.float64)
    return ema


# 0.2 caps the warm-up (1 + s) / (10 + s) from s = 2 on; 0.999 never does within K steps.
@pytest.mark.parametrize("decay", [0.2, 0.999])
def test_ema_after_k_steps_matches_numpy(decay):
    optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=1, final_lr_frac=0.1, b1=0.9,
                                           b2=0.99, weight_decay=0.0, grad_clip=0.0))
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32)}
    state = train.TrainState.create(apply_fn=None, params=params, ema_params=params,
                                    tx=train.make_optimizer(optim, K))
    step = jax.jit(functools.partial(train.train_step, loss_fn=quadratic_loss, ema_decay=decay))
    batch = {"target": jnp.array([0.3, 0.7, -1.1], jnp.float32)}
    history = [np.asarray(state.params["w"])]
    for s in range(K):
        state, metrics = step(state, batch, jax.random.key(s))
        assert bool(metrics["finite"]) and int(state.step) == s + 1
        history.append(np.asarray(state.params["w"]))
        if s == 0:  # the first update weighs the new parameters 0.9, whatever the decay
            np.testing.assert_allclose(np.asarray(state.ema_params["w"], np.float64),
                                       0.1 * np.float64(history[0]) + 0.9 * np.float64(history[1]),
                                       rtol=1e-6)
    assert np.abs(history[-1] - history[1]).min() > 1e-2  # the parameters did move
    want = ema_reference(history, decay)
    np.testing.assert_allclose(np.asarray(state.ema_params["w"], np.float64), want, rtol=1e-6, atol=1e-7)
    assert np.abs(want - history[-1]).min() > 1e-3  # the EMA lags: equal to params would fail


def test_latents_encode_scale_unscale_decode_round_trip(smoke_workdir):
    """The LDM's view of the first stage: posterior samples of the images the scale factor
    was measured on have unit std after scaling, and unscale -> decode is exactly decode
    of the posterior sample (the LDM decodes z / scale_factor once, at the end)."""
    import os

    from ldm_jax import checkpoints, data, nets, stages

    ldm_meta = checkpoints.stored_meta(os.path.join(smoke_workdir, "ldm"))
    vae, variables, cfg, vae_meta = checkpoints.load_vae(smoke_workdir, ldm_meta["vae_step"])
    images, _ = data.load("package", "train")
    images = data.to_float(images[:cfg["data"]["max_examples"]])
    mean, std = stages.encode_dataset(vae, variables, images)
    z = mean + std * np.random.default_rng(0).standard_normal(mean.shape).astype(np.float32)
    scaled = z * ldm_meta["scale_factor"]
    assert ldm_meta["scale_factor"] == pytest.approx(1.0 / vae_meta["latent_std_sample"])
    assert abs(float(np.std(scaled, dtype=np.float64)) - 1.0) < 0.02
    decode = jax.jit(lambda v, z: vae.apply(v, z, method=nets.VAE.decode))
    np.testing.assert_allclose(decode(variables, scaled[:64] / ldm_meta["scale_factor"]),
                               decode(variables, z[:64]), atol=1e-5)
    # Decoding the posterior mean is the autoencoder's reconstruction of the image.
    recon, _ = jax.jit(lambda v, x: vae.apply(v, x, method=nets.VAE.reconstruct))(
        variables, images[:64])
    np.testing.assert_allclose(decode(variables, mean[:64]), recon, atol=1e-5)
