"""The first stage's optional adversarial loss (loss.adversarial_weight > 0): which player
each loss reaches, the warm-up, the adaptive weight against a hand computation, and a
smoke run whose checkpoint the readers load without the discriminator; and the same term
in a few-step student's loss (distill.adversarial_weight > 0) against a hand computation."""

import functools
import json
import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import checkpoints, configs, consistency, data, models, nets, stages, train

START = 3  # the smoke preset's loss.adversarial_start


@pytest.fixture(scope="module")
def adv():
    """compute(step, w): a one-level smoke VAE's loss with the adversarial term at weight w and its
    gradient at `step`; the weight-0 loss of the same VAE parameters (`plain`); and `hand`,
    the gradients of L_rec and L_G with respect to the decoder's output kernel, by jax.jacrev
    of the whole forward pass in that kernel. Step and weight are traced (the config is a
    namespace holding w), so every test here shares one compilation."""
    c = configs.get_config("vae", "smoke")
    c.loss.adversarial_weight = 0.5
    c.model.channels, c.model.latent_ch = (8,), 2  # one level (14x14x2): half the compile time
    configs.validate(c)
    assert c.loss.adversarial_start == START
    vae, disc = models.build_vae(c), models.build_discriminator(c)
    x = data.to_float(data.load_mnist("test")[0][:8])  # [8, 28, 28, 1]
    key = jax.random.key(1)
    z_key, vq_key = jax.random.split(key)  # as vae_loss splits it

    def config(w):
        return types.SimpleNamespace(loss=types.SimpleNamespace(**dict(
            c.loss.to_dict(), adversarial_weight=w)), autoencoder=c.autoencoder)

    def hand(params):
        vae_params, disc_params = models.split_discriminator(params)
        out = vae_params["decoder"]["Conv_2"]

        def recon(w):
            dec = dict(vae_params["decoder"], Conv_2=dict(out, kernel=w))
            return vae.apply({"params": dict(vae_params, decoder=dec)}, x, z_key,
                             rngs={"vq": vq_key})[0]
        def losses(w):  # [L_rec, L_G]; r is the decoder's output (logits for bernoulli)
            r = recon(w)
            image = nets.decoder_image(r, vae.likelihood)
            return jnp.stack([jnp.mean(stages.reconstruction_nll(r, x, vae.likelihood)),
                              -jnp.mean(disc.apply({"params": disc_params}, image))])
        return jax.jacrev(losses)(out["kernel"])  # [2, 3, 3, 8, 1]

    @jax.jit
    def compute(step, w):
        k = jax.random.key(0)
        params = {**vae.init(k, x[:1], k)["params"],
                  models.DISCRIMINATOR: disc.init(jax.random.fold_in(k, 1), x[:1])["params"]}
        batch = {"image": x, "step": step}
        loss = functools.partial(stages.vae_loss, vae, config(w), None, disc)
        plain = stages.vae_loss(vae, config(0.0), None, None,
                                models.split_discriminator(params)[0], {}, batch, key)[0]
        return dict(params=params, plain=plain, hand=hand(params),
                    on=jax.value_and_grad(loss, has_aux=True)(params, {}, batch, key))
    return lambda step, w=0.5: compute(jnp.int32(step), jnp.float32(w))


def _abs_max(tree) -> float:
    return max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(tree))


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_each_player_gets_gradients_only_from_its_own_loss(adv):
    (_, (m, _)), grads = adv(START)["on"]
    vae_grads, disc_grads = models.split_discriminator(grads)
    assert float(m["adv_weight"]) > 0 and _abs_max(disc_grads) > 0 and _abs_max(vae_grads) > 0
    # Weight 0 leaves L_D alone on: the discriminator's gradient is the same, so L_G does
    # not reach it; the VAE's changes, so L_G reaches the VAE.
    _, grads_0 = adv(START, 0.0)["on"]
    vae_grads_0, disc_grads_0 = models.split_discriminator(grads_0)
    chex.assert_trees_all_close(disc_grads, disc_grads_0, rtol=1e-6, atol=1e-9)
    assert _abs_max(jax.tree.map(jnp.subtract, vae_grads["decoder"], vae_grads_0["decoder"])) > 1e-3
    # At weight 0, switching L_D on (START - 1 -> START) leaves the VAE's gradient as it
    # was: L_D does not reach the VAE.
    _, grads_off = adv(START - 1, 0.0)["on"]
    chex.assert_trees_all_close(models.split_discriminator(grads_off)[0], vae_grads_0,
                                rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_before_the_start_the_loss_is_the_weight_zero_loss_exactly(adv):
    out = adv(START - 1)
    (loss, (m, _)), grads = out["on"]
    assert float(loss) == float(out["plain"])
    assert float(m["adv_weight"]) == 0.0 and float(m["disc_loss"]) > 0
    assert _abs_max(models.split_discriminator(grads)[1]) == 0.0  # the discriminator waits
    (loss_on, _), _ = adv(START)["on"]
    assert float(loss_on) != float(out["plain"])  # and from the start it differs


def test_adaptive_weight_matches_a_hand_computation(adv):
    """lambda = ||d L_rec / dW|| / (||d L_G / dW|| + 1e-4), W the decoder's output kernel."""
    out = adv(START)
    vae_params = models.split_discriminator(out["params"])[0]
    assert nets.last_decoder_layer(vae_params) == ("decoder", "Conv_2", "kernel")
    assert vae_params["decoder"]["Conv_2"]["kernel"].shape[-1] == 1  # the 1-channel image out
    g_rec, g_g = np.asarray(out["hand"], np.float64)
    want = np.linalg.norm(g_rec) / (np.linalg.norm(g_g) + 1e-4)
    (_, (m, _)), _ = out["on"]
    assert 1 < want < 1e4  # neither clip bound: the ratio itself is checked
    assert float(m["adv_lambda"]) == pytest.approx(want, rel=1e-4)
    assert float(m["adv_weight"]) == pytest.approx(0.5 * float(m["adv_lambda"]), rel=1e-6)
    # The clip: a vanishing generator gradient gives 1e4, never more; never below 0.
    assert float(stages.adaptive_weight(jnp.ones(4), jnp.zeros(4))) == 1e4
    assert float(stages.adaptive_weight(jnp.zeros(4), jnp.ones(4))) == 0.0


def test_hinge_loss_and_separate_clipping():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # real: relu(1 - D) = 0, 0.5, 2; fake: relu(1 + D) = 0, 1, 2
    assert float(stages.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    clip = train.clip_by_part_norm(1.0, (models.DISCRIMINATOR,))
    g = {"decoder": {"k": jnp.array([30.0, 40.0])}, models.DISCRIMINATOR: {"k": jnp.array([0.6])}}
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(out["decoder"]["k"], [0.6, 0.8], rtol=1e-6)  # its own norm, 50
    np.testing.assert_allclose(out[models.DISCRIMINATOR]["k"], [0.6])  # not rescaled by the VAE's
    plain = {"a": jnp.array([3.0, 4.0])}
    np.testing.assert_allclose(clip.update(plain, clip.init(plain))[0]["a"], [0.6, 0.8], rtol=1e-6)


def test_validation_and_old_configs():
    c = configs.get_config("vae", "smoke")
    c.loss.adversarial_weight = -0.1
    with pytest.raises(configs.ConfigError, match="adversarial_weight"):
        configs.validate(c)
    c.loss.adversarial_weight, c.loss.adversarial_start = 0.1, -1
    with pytest.raises(configs.ConfigError, match="adversarial_start"):
        configs.validate(c)
    c.loss.adversarial_start, c.loss.disc_channels = 3, (8, 12)
    with pytest.raises(configs.ConfigError, match="disc_channels"):
        configs.validate(c)
    c.loss.disc_channels = (8, 16)
    configs.validate(c)
    assert models.build_discriminator(c).channels == (8, 16)
    stored = configs.get_config("vae", "smoke").to_dict()
    stored["loss"]["adversarial_weight"] = 0.5
    del stored["loss"]["disc_channels"]  # a checkpoint from before the width was an option
    assert models.build_discriminator(stored).channels == (32, 64)
    del stored["loss"]["adversarial_weight"], stored["loss"]["adversarial_start"]
    old = checkpoints.config_from_stored(stored)  # a checkpoint from before the option
    assert old.loss.adversarial_weight == 0.0 and models.build_discriminator(stored) is None


@pytest.mark.slow  # ~1 min on 2 cores: two smoke trainings and a resume
def test_smoke_run_trains_resumes_and_loads_without_the_discriminator(tmp_path):
    c = configs.get_config("vae", "smoke")
    c.loss.adversarial_weight = 0.5
    full = train.train_and_evaluate(c, str(tmp_path / "a"))
    assert models.DISCRIMINATOR in full.params and models.DISCRIMINATOR in full.ema_params
    train.train_and_evaluate(c, str(tmp_path / "b"), stop_at_step=START + 1)
    resumed = train.train_and_evaluate(c, str(tmp_path / "b"))
    chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-5, atol=1e-6)

    log = (tmp_path / "a" / "vae" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in log.splitlines()]
    assert {"disc_loss", "g_loss", "adv_lambda", "adv_weight"} <= set(rows[-1])
    assert rows[0]["adv_weight"] == 0.0 and rows[-1]["adv_weight"] > 0  # steps 0-1 vs 4-5

    vae, variables, cfg, meta = checkpoints.load_vae(str(tmp_path / "a"))
    assert models.DISCRIMINATOR not in variables["params"] and meta["finished"]
    chex.assert_trees_all_equal(variables["params"], models.split_discriminator(full.ema_params)[0])
    images = data.to_float(data.load_mnist("test")[0][:8])
    recon, _ = vae.apply(variables, images, method=nets.VAE.reconstruct)
    assert recon.shape == images.shape and bool(jnp.all(jnp.isfinite(recon)))
    # The LDM binds to the VAE's own weights: what it encodes with is what load_vae gives.
    train.train_and_evaluate(configs.get_config("ldm", "smoke"), str(tmp_path / "a"))
    ldm_meta = checkpoints.stored_meta(os.path.join(tmp_path, "a", "ldm"))
    assert ldm_meta["vae_digest"] == checkpoints.tree_digest(variables)


def _student_loss(step, weight=1.0):
    """stages.student_loss on pixel-space x_0 (to_image the identity, as for distill_pixel):
    (loss, metrics) and the gradients in (pred, discriminator params)."""
    d = types.SimpleNamespace(adversarial_weight=weight, adversarial_start=START)
    disc = nets.PatchDiscriminator((8, 16))
    x0 = data.to_float(data.load_mnist("test")[0][:4])
    pred = jnp.clip(x0 + 0.3 * jax.random.normal(jax.random.key(2), x0.shape), -1, 1)
    want = jnp.roll(x0, 1, axis=2)
    disc_params = disc.init(jax.random.key(3), x0[:1])["params"]
    fn = lambda p, dp: stages.student_loss(p, want, x0, (disc, lambda x: x), dp, d,
                                           jnp.int32(step))
    out, grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(pred, disc_params)
    return out, grads, dict(disc=disc, disc_params=disc_params, x0=x0, pred=pred, want=want)


def test_the_students_adversarial_term_against_a_hand_computation():
    """pred's gradient is dL/dpred + w lambda dL_G/dpred, lambda the ratio of their norms
    (float64); the discriminator's is the hinge loss's alone; before the start, the plain loss."""
    (loss, m), (g_pred, g_disc), a = _student_loss(START)
    plain = lambda p: jnp.mean(consistency.pseudo_huber(p, a["want"]))
    g_rec = np.asarray(jax.grad(plain)(a["pred"]), np.float64)
    d_of = lambda dp, x: a["disc"].apply({"params": dp}, x)
    g_gen = np.asarray(jax.grad(lambda p: -jnp.mean(d_of(a["disc_params"], p)))(a["pred"]),
                       np.float64)
    lam = np.linalg.norm(g_rec) / (np.linalg.norm(g_gen) + 1e-4)
    assert float(m["adv_lambda"]) == pytest.approx(lam, rel=1e-4) and 0 < lam < 1e4
    np.testing.assert_allclose(g_pred, g_rec + lam * g_gen, rtol=2e-4, atol=1e-7)
    hinge = lambda dp: stages.hinge_d_loss(d_of(dp, a["x0"]), d_of(dp, a["pred"]))
    chex.assert_trees_all_close(g_disc, jax.grad(hinge)(a["disc_params"]), rtol=1e-5, atol=1e-7)
    assert float(m["distill"]) == pytest.approx(float(plain(a["pred"])), rel=1e-6)
    (loss_off, m_off), (g_pred_off, g_disc_off), _ = _student_loss(START - 1)
    assert float(loss_off) == float(plain(a["pred"])) and float(m_off["adv_weight"]) == 0.0
    np.testing.assert_allclose(g_pred_off, g_rec, rtol=1e-6, atol=1e-9)
    assert _abs_max(g_disc_off) == 0.0  # the discriminator waits too


def test_the_students_adversarial_options_are_checked():
    for field, value in (("adversarial_weight", -1.0), ("adversarial_start", -1),
                         ("disc_channels", (8, 12))):
        c = configs.get_config("distill", "smoke")
        c.distill[field] = value
        with pytest.raises(configs.ConfigError, match=f"distill.{field}"):
            configs.validate(c)
    stored = configs.get_config("distill", "smoke").to_dict()
    del stored["distill"]["adversarial_weight"]  # a student from before the option
    assert checkpoints.config_from_stored(stored).distill.adversarial_weight == 0.0
