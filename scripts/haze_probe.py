"""Where a pixel model's background haze comes from: docs/results.md, "Where the LDM loses".

    python scripts/haze_probe.py --workdir=W --num=300

Noises the first 500 holdout digits to small t, predicts x_0 with the model (clipped as its
sampler clips), and prints the pixel shares of the prediction and of the noisy input; then
draws --num samples with the model's default sampler and prints theirs. A model that removes
the noise it is given has fewer pixels in 1-15 than its input.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ldm_jax import cli, data, diffusion, metrics, models, sample, score

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir with a trained pixel model.")
flags.DEFINE_integer("holdout", 2000, "The validation images: the last HOLDOUT training images.")
flags.DEFINE_list("t", ["0", "5", "10", "20", "40", "100"], "Timesteps to noise to.")
flags.DEFINE_integer("num", 300, "Samples of the default sampler (0: none).")
flags.mark_flag_as_required("workdir")


def shares(x: np.ndarray) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.pixel_stats(data.to_uint8(x)).items()}


def main(argv):
    del argv
    cli.setup_jax()
    score.require_val_unseen(FLAGS.workdir, ["pixel"], FLAGS.holdout, "haze_probe")
    gen = sample.load_generator(FLAGS.workdir, "pixel")
    net_fn = models.unet_fn(gen.unet, gen.config["model"], gen.params)
    eps_fn = diffusion.eps_fn_from_model(net_fn, gen.sched, models.prediction(gen.config["diffusion"]))
    x0 = jnp.asarray(data.to_float(score.split_images("val", FLAGS.holdout)[:500]))

    @jax.jit
    def denoise(t, key):
        tt = jnp.full((x0.shape[0],), t)
        x_t = diffusion.q_sample(gen.sched, x0, tt, jax.random.normal(key, x0.shape))
        pred = diffusion.predict_xstart_from_eps(gen.sched, x_t, tt, eps_fn(x_t, tt))
        return jnp.clip(pred, -1, 1), jnp.clip(x_t / gen.sched.sqrt_alphas_cumprod[t], -1, 1)

    print(json.dumps(dict(what="real", **shares(np.asarray(x0)))))
    for t in (int(v) for v in FLAGS.t):
        pred, noisy = denoise(t, jax.random.key(t))
        print(json.dumps(dict(t=t, predicted=shares(np.asarray(pred)),
                              noisy=shares(np.asarray(noisy)))), flush=True)
    if FLAGS.num:
        c = gen.config["sample"]
        x = sample.generate(gen, FLAGS.num, jax.random.key(7), c["sampler"], c["steps"], c["eta"],
                            progress=False)
        print(json.dumps(dict(what=f"{FLAGS.num} samples", **metrics.pixel_stats(x))))


if __name__ == "__main__":
    app.run(main)
