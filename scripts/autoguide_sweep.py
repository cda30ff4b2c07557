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
line per w; samples by sample.generate in batches of 200, batch i drawn with
fold_in(key(evaluate's seed), i).
"""
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from ldm_jax import cli, data, evaluate, features, metrics, nets, sample


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
    model = dataclasses.replace(model, guide_params=guide.params)

    for w in ws:
        t = time.time()
        # Batches of 200, batch i drawn with fold_in(key(evaluate's seed), i); split over the
        # CPU devices like every sample; one compilation per w.
        xs = sample.generate(model, num, jax.random.key(evaluate.SAMPLE_SEED), "ddim", steps, eta,
                             batch_size=200, progress=False, autoguidance=w)
        hist = np.bincount(probs_fn(xs).argmax(-1), minlength=10)
        print(json.dumps(dict(stage=stage, steps=steps, eta=eta, guide=guide_spec, w=w, num=num,
                              fid=metrics.fid_from_features(real, feat_fn(xs)),
                              confident=confident(xs), classes=hist.tolist(),
                              sample_s=round(time.time() - t, 1))), flush=True)


if __name__ == "__main__":
    main()
