"""Autoguidance sweep: classifier FID and confident share of one LDM (or pixel model) guided
by an earlier checkpoint, for several weights w (eps = (1 + w) eps - w eps_guide; DDIM).

    python scripts/autoguide_sweep.py WORKDIR GUIDE_WORKDIR@STEP NUM W ...
        [env: STEPS=50 (DDIM steps), ETA=1, STAGE=ldm|pixel]
    python scripts/autoguide_sweep.py runs/ag runs/ag@500 2000 0 1 2 3
    STAGE=pixel python scripts/autoguide_sweep.py runs/agpx runs/agpx@100 600 0 1 2
    python scripts/autoguide_sweep.py runs/ag - 2000       # the decoder's ceiling instead:
                                                           # NUM test images, reconstructed

The guide can be any checkpoint of the same stage, for an LDM one on the same VAE (train with
--config.train.ckpt_every=500 --config.train.keep_checkpoints=20 to keep them all). One JSON
line per w; samples in batches of 200, batch i drawn with fold_in(key(evaluate's seed), i).
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import cli, data, diffusion, evaluate, features, metrics, models, nets, sample


def eps_of(gen, params):
    return diffusion.eps_fn_from_model(models.unet_fn(gen.unet, gen.config["model"], params),
                                       gen.sched, models.prediction(gen.config["diffusion"]))


def main() -> None:
    workdir, guide_spec, num = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ws, steps = [float(w) for w in sys.argv[4:]], int(os.environ.get("STEPS", 50))
    eta, stage = float(os.environ.get("ETA", 1.0)), os.environ.get("STAGE", "ldm")
    cli.setup_jax()
    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs_fn = features.probabilities_fn(features.DEFAULT_PATH)
    real = evaluate.reference_features(feat_fn, features.DEFAULT_PATH)
    model = sample.load_generator(workdir, stage)
    confident = lambda u8: float(np.mean(probs_fn(u8).max(-1) > 0.9))
    if guide_spec == "-" and stage == "ldm":
        x = data.to_float(data.load("package", "test")[0][:num])
        rec = jax.jit(lambda v: model.vae.apply(model.vae_vars, v, method=nets.VAE.reconstruct)[0])
        u8 = data.to_uint8(np.clip(np.concatenate(
            [np.asarray(rec(x[i:i + 500])) for i in range(0, num, 500)]), -1, 1))
        print(json.dumps(dict(what="reconstructions", num=num,
                              fid=metrics.fid_from_features(real, feat_fn(u8)),
                              confident=confident(u8),
                              real_confident=confident(data.to_uint8(x)))), flush=True)
        return
    guide_dir, _, guide_step = guide_spec.partition("@")
    guide = sample.load_generator(guide_dir, stage, int(guide_step) if guide_step else None)
    if guide.scale_factor != model.scale_factor:
        raise SystemExit("the guide was trained on another VAE")
    n = min(num, 200)

    @jax.jit
    def run(params, guide_params, key, w):
        eps = diffusion.autoguided_eps_fn(eps_of(model, params), eps_of(guide, guide_params), w)
        z = diffusion.ddim_sample(eps, model.sched, key, (n, *model.shape), steps, eta,
                                  bool(model.config["diffusion"]["clip_x0"]))
        if model.vae is None:
            return jnp.clip(z, -1, 1)
        return jnp.clip(model.vae.apply(model.vae_vars, z / model.scale_factor,
                                        method=nets.VAE.decode), -1, 1)

    for w in ws:
        t, key = time.time(), jax.random.key(evaluate.SAMPLE_SEED)
        xs = np.concatenate([data.to_uint8(np.asarray(run(model.params, guide.params,
                                                          jax.random.fold_in(key, i),
                                                          jnp.float32(w))))
                             for i in range(-(-num // n))])[:num]
        hist = np.bincount(probs_fn(xs).argmax(-1), minlength=10)
        print(json.dumps(dict(stage=stage, steps=steps, eta=eta, guide=guide_spec, w=w, num=num,
                              fid=metrics.fid_from_features(real, feat_fn(xs)),
                              confident=confident(xs), classes=hist.tolist(),
                              sample_s=round(time.time() - t, 1))), flush=True)


if __name__ == "__main__":
    main()
