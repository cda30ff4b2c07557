"""Is the README job's first stage limited by its decoder's training? Fine-tune the decoder
(and the discriminator) of a trained VAE with the encoder frozen, as Stable Diffusion's
decoders were fine-tuned, so the latent space and the LDM trained on it stay valid; then
write the reconstructions of the first --num test digits and the LDM's samples (its default
sampler at --autoguidance, seed --seed) decoded by the new decoder, for inception_probe.py:

    python scripts/decoder_finetune.py --workdir=W --steps=1200 --out=F
    python scripts/inception_probe.py --npz=F_rec.npz --splits=test      # rFID on test
    python scripts/inception_probe.py --npz=F_smp.npz --splits=val,test  # the LDM's samples

--steps=0 writes the unchanged VAE's, to check the protocol against sample and the probe.
Nothing in W is written: the tuned decoder lives only in this process.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from ldm_jax import checkpoints, cli, data, models, sample, score, stages, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir with a trained vae/ and the ldm/ trained on it.")
flags.DEFINE_integer("steps", 1200, "Decoder steps (batch 64; 0: the VAE as trained).")
flags.DEFINE_float("lr", 1e-3, "Peak lr (50 warmup steps, cosine to a tenth).")
flags.DEFINE_float("adversarial_weight", 0.5, "The adversarial term's weight while tuning.")
flags.DEFINE_float("autoguidance", 1.5, "The LDM's autoguidance w for its samples.")
flags.DEFINE_integer("num", 2000, "Reconstructions and samples to write.")
flags.DEFINE_integer("seed", 7, "Sampling seed.")
flags.DEFINE_string("out", None, "Writes OUT_rec.npz and OUT_smp.npz.")
flags.mark_flags_as_required(["workdir", "out"])


def tune_decoder(c, params: dict, model_state: dict, steps: int) -> dict:
    """The EMA (0.99) of the decoder and discriminator after `steps` Adam steps on the VAE
    loss (stages.vae_loss, adversarial term on), the encoder held fixed."""
    model, disc = models.build_vae(c), models.build_discriminator(c)
    loss_fn = functools.partial(stages.vae_loss, model, c, None, disc)
    encoder = params["encoder"]
    trained = {k: v for k, v in params.items() if k != "encoder"}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, 50, steps, FLAGS.lr / 10), b2=0.99))

    @jax.jit
    def step(trained, opt, ema, x, key, i):
        batch = {"image": x, "step": jnp.int32(c.loss.adversarial_start)}
        grads = jax.grad(lambda t: loss_fn({**t, "encoder": encoder}, model_state, batch,
                                           key)[0])(trained)
        updates, opt = tx.update(grads, opt, trained)
        trained = optax.apply_updates(trained, updates)
        return trained, opt, optax.incremental_update(trained, ema,
                                                      1.0 - train.ema_decay_at(i, 0.99))

    images = data.to_float(stages.train_split(c)[0])  # the holdout stays out
    rng = np.random.default_rng(c.seed)
    opt, ema = tx.init(trained), trained
    for i in range(steps):
        x = images[rng.integers(0, len(images), 64)]
        trained, opt, ema = step(trained, opt, ema, x, jax.random.key(i), i)
    return {"encoder": encoder, "decoder": ema["decoder"]}


def main(argv):
    del argv
    if 0 < FLAGS.steps <= 50:
        raise app.UsageError("--steps must be 0 or above the 50 warmup steps", exitcode=2)
    cli.setup_jax()
    params, model_state, cfg, meta = checkpoints.load_checkpoint(
        f"{FLAGS.workdir}/vae", with_state=True)
    c = checkpoints.config_from_stored(cfg)
    c.loss.adversarial_weight = FLAGS.adversarial_weight
    if FLAGS.steps:
        params = tune_decoder(c, params, model_state, FLAGS.steps)
    variables = {"params": {k: params[k] for k in ("encoder", "decoder")}, **model_state}
    test = score.split_images("test", 0)[:FLAGS.num]
    recons = score.reconstruct((models.build_vae(c), variables, cfg, meta), test)[0]
    np.savez_compressed(f"{FLAGS.out}_rec.npz", images=data.to_uint8(recons))
    gen = dataclasses.replace(sample.load_generator(FLAGS.workdir, "ldm"), vae_vars=variables)
    s = gen.config["sample"]
    images = sample.generate(gen, FLAGS.num, jax.random.key(FLAGS.seed), s["sampler"],
                             s["steps"], s["eta"], autoguidance=FLAGS.autoguidance)
    np.savez_compressed(f"{FLAGS.out}_smp.npz", images=images)


if __name__ == "__main__":
    app.run(main)
