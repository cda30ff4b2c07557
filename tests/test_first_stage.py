"""The first stage's output likelihood (why samples have MNIST's black background) and the
validation holdout that defaults are chosen on."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import configs, data, models, nets, stages, train


def test_bernoulli_nll_matches_float64_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (3, 28, 28, 1))
    t = rng.uniform(0, 1, logits.shape)
    t[0] = 0.0  # exact black, as 80 % of MNIST
    p = 1.0 / (1.0 + np.exp(-logits))
    ref = -np.sum(t * np.log(p) + (1 - t) * np.log1p(-p), axis=(1, 2, 3))
    got = stages.reconstruction_nll(jnp.asarray(logits, jnp.float32),
                                    jnp.asarray(2 * t - 1, jnp.float32), "bernoulli")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)
    gauss = stages.reconstruction_nll(jnp.asarray(logits, jnp.float32),
                                      jnp.asarray(2 * t - 1, jnp.float32), "gaussian")
    np.testing.assert_allclose(np.asarray(gauss), np.sum((logits - (2 * t - 1)) ** 2, (1, 2, 3)),
                               rtol=1e-5)


def test_hurdle_nll_matches_float64_zero_and_intensity_cross_entropies():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (3, 28, 28, 2))
    t = np.round(rng.uniform(0, 1, (3, 28, 28, 1)) * 255) / 255
    t[0] = 0.0
    t[1, :10] = 1.0
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))
    p, q, ink = sig(logits[..., :1]), sig(logits[..., 1:]), (t > 0).astype(np.float64)
    ref = -np.sum(ink * np.log(p) + (1 - ink) * np.log1p(-p)
                  + ink * (t * np.log(q) + (1 - t) * np.log1p(-q)), axis=(1, 2, 3))
    got = stages.reconstruction_nll(jnp.asarray(logits, jnp.float32),
                                    jnp.asarray(2 * t - 1, jnp.float32), "hurdle")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_hurdle_logit_nll_matches_float64_logit_normal_intensity():
    rng = np.random.default_rng(2)
    out = rng.normal(0, 2, (3, 28, 28, 3))
    out[1, :5, :, 2] = -9.0  # log scales beyond the clip
    t = np.round(rng.uniform(0, 1, (3, 28, 28, 1)) * 255) / 255
    t[0] = 0.0
    t[2, :10] = 1.0
    ink, p = (t > 0).astype(np.float64), 1.0 / (1.0 + np.exp(-out[..., :1]))
    tc = np.clip(t, 0.5 / 255, 254.5 / 255)
    log_s = np.clip(out[..., 2:], -3.0, 2.0)
    gauss = 0.5 * ((np.log(tc / (1 - tc)) - out[..., 1:2]) / np.exp(log_s)) ** 2 + log_s
    ref = np.sum(-(ink * np.log(p) + (1 - ink) * np.log1p(-p)) + ink * gauss, axis=(1, 2, 3))
    got = stages.reconstruction_nll(jnp.asarray(out, jnp.float32),
                                    jnp.asarray(2 * t - 1, jnp.float32), "hurdle_logit")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_hurdle_decoder_image_is_zero_where_zero_is_likelier():
    ink = np.array([-9.0, -0.1, 0.1, 3.0, 9.0])
    intensity = np.array([5.0, 5.0, -1.0, 50.0, 0.0])
    out = jnp.asarray(np.stack([ink, intensity], -1)[:, None, None, :], jnp.float32)
    sig = lambda a: 1.0 / (1.0 + np.exp(-a))
    hard = np.where(ink > 0, 2 * sig(intensity) - 1, -1.0)
    np.testing.assert_allclose(np.asarray(nets.decoder_image(out, "hurdle"))[:, 0, 0, 0], hard,
                               atol=1e-6)
    mean = 2 * sig(ink) * sig(intensity) - 1
    np.testing.assert_allclose(np.asarray(nets.decoder_image(out, "hurdle", mean=True))[:, 0, 0, 0],
                               mean, atol=1e-6)
    u8 = data.to_uint8(np.broadcast_to(np.asarray(nets.decoder_image(out, "hurdle")),
                                       (5, 28, 28, 1)))[:, 0, 0]
    assert list(u8[:2]) == [0, 0] and u8[3] == 255  # exact black below the hurdle
    with_scale = jnp.concatenate([out, jnp.full_like(out[..., :1], 7.0)], -1)  # hurdle_logit
    np.testing.assert_array_equal(nets.decoder_image(with_scale, "hurdle_logit"),
                                  nets.decoder_image(out, "hurdle"))


def test_decoder_image_maps_logits_into_the_image_range():
    out = jnp.array([-50.0, -8.0, 0.0, 8.0, 50.0])
    np.testing.assert_allclose(nets.decoder_image(out, "bernoulli"),
                               2 / (1 + np.exp(-np.asarray(out, np.float64))) - 1, atol=1e-6)
    np.testing.assert_array_equal(nets.decoder_image(out, "gaussian"), out)
    u8 = data.to_uint8(np.broadcast_to(nets.decoder_image(out, "bernoulli")[:, None, None, None],
                                       (5, 28, 28, 1)))
    assert u8[0].max() == 0 and u8[-1].min() == 255  # saturates at both ends


@pytest.fixture(scope="module")
def short_vae(tmp_path_factory):
    """A smoke-sized first stage trained 400 steps with each likelihood, on the same data
    (about a minute each on 2 cores, so the test that uses it is marked slow)."""
    out = {}
    for likelihood in ("bernoulli", "gaussian", "hurdle"):
        c = configs.get_config("vae", "smoke")
        c.autoencoder.likelihood = likelihood
        c.train.steps, c.train.ckpt_every, c.train.log_every = 400, 400, 100
        c.optim.lr = 3e-3
        workdir = str(tmp_path_factory.mktemp(likelihood))
        train.train_and_evaluate(c, workdir)
        from ldm_jax import checkpoints
        out[likelihood] = checkpoints.load_vae(workdir)
    return out


def _reconstruct(first_stage, images_u8):
    vae, variables, _, _ = first_stage
    rec = vae.apply(variables, data.to_float(images_u8), method=nets.VAE.reconstruct)[0]
    return data.to_uint8(np.asarray(rec))


@pytest.mark.slow
def test_each_likelihood_leaves_less_haze_and_hurdle_keeps_black_exact(short_vae):
    black = np.zeros((4, 28, 28), np.uint8)
    assert _reconstruct(short_vae["hurdle"], black).max() == 0  # bernoulli: only in the limit
    test = data.load("package", "test")[0][:200]
    rec = {k: _reconstruct(v, test) for k, v in short_vae.items()}
    background = {k: np.mean(r[test == 0] == 0) for k, r in rec.items()}
    assert background["gaussian"] < background["bernoulli"] < background["hurdle"]
    faint = {k: np.mean((r >= 1) & (r <= 15)) for k, r in rec.items()}
    assert faint["gaussian"] > faint["bernoulli"] > faint["hurdle"]


def _row_hashes(images: np.ndarray) -> set:
    return {hashlib.md5(x.tobytes()).hexdigest() for x in images}


def test_holdout_images_never_appear_in_a_training_batch():
    c = configs.get_config("vae", "smoke")
    c.data.max_examples, c.data.holdout, c.data.batch_size = 0, 59_000, 250
    configs.validate(c)
    train_u8, _ = data.load("package", "train")
    held = _row_hashes(train_u8[-c.data.holdout:])
    task = stages.TASKS["vae"](c, workdir=None)
    assert len(task.arrays["image"]) == 60_000 - c.data.holdout
    seen = set()
    for step in range(8):  # two epochs of 1,000 images
        seen |= _row_hashes(data.to_uint8(task.get_batch(step)["image"]))
    assert len(seen) > 900 and not seen & held
    c.data.holdout = 59_990
    with pytest.raises(configs.ConfigError, match="holdout"):
        configs.validate(c)


def test_a_first_stage_stored_without_a_likelihood_stays_gaussian():
    from ldm_jax import checkpoints, models
    stored = configs.get_config("vae", "smoke").to_dict()
    del stored["autoencoder"]["likelihood"]  # written before the field existed
    assert checkpoints.config_from_stored(stored).autoencoder.likelihood == "gaussian"
    assert models.build_vae(stored).likelihood == "gaussian"


def test_l1_term_adds_its_weight_times_a_float64_l1_distance():
    """loss.l1_weight w adds w * sum |image - x| / 2 (the [0, 1] scale) to the first stage's loss."""
    c = configs.get_config("vae", "smoke")
    c.model.channels, c.model.latent_ch = (8,), 2  # one level: a quick compile
    vae = models.build_vae(c)
    x = data.to_float(data.load_mnist("test")[0][:4])
    key = jax.random.key(1)
    params = vae.init(key, x[:1], key)["params"]
    batch = {"image": x, "step": jnp.int32(0)}

    def loss(w):
        c.loss.l1_weight = w
        return stages.vae_loss(vae, c, None, None, params, {}, batch, key)

    plain, (m0, _) = loss(0.0)
    weighted, (m, _) = loss(3.0)
    z_key, vq_key = jax.random.split(key)  # as vae_loss splits it
    out = vae.apply({"params": params}, x, z_key, rngs={"vq": vq_key})[0]
    image = 2 / (1 + np.exp(-np.asarray(out, np.float64))) - 1
    want = np.mean(np.sum(np.abs(image - np.asarray(x, np.float64)), axis=(1, 2, 3))) / 2
    assert "l1" not in m0
    np.testing.assert_allclose(float(m["l1"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(weighted - plain), 3.0 * want, rtol=1e-4)
