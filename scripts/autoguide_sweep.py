"""Classifier FID and recognisable share of one LDM (or pixel model) guided by an earlier
checkpoint of itself at several weights w (eps = (1 + w) eps - w eps_guide; DDIM):
docs/results.md, "Autoguidance, guides and samplers".

    python scripts/autoguide_sweep.py --workdir=W --guide=GUIDE_WORKDIR@STEP --num=N --weights=W,...
    python scripts/autoguide_sweep.py --workdir=runs/ag --guide=runs/ag@500 --num=2000 --weights=0,1,2,3
    python scripts/autoguide_sweep.py --stage=pixel --workdir=runs/agpx --guide=runs/agpx@100 --num=600 \
        --weights=0,1,2
    python scripts/autoguide_sweep.py --workdir=runs/ag --guide=- --num=2000   # the decoder's ceiling
                                                                # instead: N test images, reconstructed

--steps (DDIM steps, 50) and --eta (1) set the sampler. The guide can be any checkpoint of
the same stage, for an LDM one on the same VAE (train with --config.train.ckpt_every=500
--config.train.keep_checkpoints=20 to keep them all). One JSON line per w; samples by
sample.generate in batches of 200, batch i drawn with fold_in(key(evaluate's seed), i).
"""
import dataclasses
import json
import time

import jax
import numpy as np
from absl import app, flags

from ldm_jax import cli, configs, data, evaluate, features, sample, score

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the guided generator.")
flags.DEFINE_string("guide", None, "GUIDE_WORKDIR@STEP (no @STEP: its latest checkpoint), or "
                    "'-': score the VAE's reconstructions of --num test images instead.")
flags.DEFINE_integer("num", None, "Samples per weight.")
flags.DEFINE_list("weights", [], "Autoguidance weights w to sample, e.g. 0,1,2.")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_float("eta", 1.0, "DDIM eta.")
flags.DEFINE_enum("stage", "ldm", list(configs.DIFFUSION_STAGES), "The generator's stage.")
for _name in ("workdir", "guide", "num"):
    flags.mark_flag_as_required(_name)


def reconstructions(model, num: int, ref: score.Reference) -> None:
    """The decoder's ceiling: the scores of num test images, reconstructed, and of the originals."""
    x = data.load("package", "test")[0][:num]
    u8 = data.to_uint8(score.reconstruct((model.vae, model.vae_vars), x)[0])
    print(json.dumps(dict(what="reconstructions", num=num, **ref.score(u8),
                          real_recognisable=ref.score(x)["recognisable"])), flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.guide == "-" and FLAGS.stage != "ldm":
        raise app.UsageError("--guide=- (reconstructions) needs --stage=ldm")
    if FLAGS.guide != "-" and not FLAGS.weights:
        raise app.UsageError("pass --weights, e.g. --weights=0,1,2")
    ws = [float(w) for w in FLAGS.weights]
    cli.setup_jax()
    ref = score.Reference(features.DEFAULT_PATH, FLAGS.num)
    model = sample.load_generator(FLAGS.workdir, FLAGS.stage)
    if FLAGS.guide == "-":
        reconstructions(model, FLAGS.num, ref)
        return
    guide_dir, _, guide_step = FLAGS.guide.partition("@")
    guide = sample.load_generator(guide_dir, FLAGS.stage, int(guide_step) if guide_step else None)
    if guide.scale_factor != model.scale_factor:
        raise SystemExit("the guide was trained on another VAE")
    model = dataclasses.replace(model, guide_params=guide.params)

    for w in ws:
        t = time.time()
        # Batches of 200, batch i drawn with fold_in(key(evaluate's seed), i); split over the
        # CPU devices like every sample; one compilation per w.
        xs = sample.generate(model, FLAGS.num, jax.random.key(evaluate.SAMPLE_SEED), "ddim",
                             FLAGS.steps, FLAGS.eta, batch_size=200, progress=False,
                             autoguidance=w)
        hist = np.bincount(ref.prob_fn(xs).argmax(-1), minlength=10)
        print(json.dumps(dict(stage=FLAGS.stage, steps=FLAGS.steps, eta=FLAGS.eta,
                              guide=FLAGS.guide, w=w, num=FLAGS.num, **ref.score(xs),
                              classes=hist.tolist(), sample_s=round(time.time() - t, 1))),
              flush=True)


if __name__ == "__main__":
    app.run(main)
