"""Classifier FID and confident share of one trained generator under several samplers.

    python scripts/sampler_sweep.py WORKDIR NUM SAMPLER:STEPS:ETA ...   [--stage=pixel]
    python scripts/sampler_sweep.py runs/demo 2000 ddim:50:0 ddim:50:1 dpmpp2m:20:0

One JSON line per sampler; the samples are drawn with the seed evaluate uses, so DDIM with
eta 0 at evaluate's steps reproduces evaluate's FID.
"""
import json
import sys
import time

import jax
import numpy as np

from ldm_jax import cli, evaluate, features, metrics, sample


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--stage=")]
    stage = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--stage=")), "ldm")
    workdir, num, specs = args[0], int(args[1]), args[2:]
    cli.setup_jax()
    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs_fn = features.probabilities_fn(features.DEFAULT_PATH)
    real = evaluate.reference_features(feat_fn, features.DEFAULT_PATH)
    gen = sample.load_generator(workdir, stage)
    for spec in specs:
        name, steps, eta = spec.split(":")
        t = time.time()
        x = sample.generate(gen, num, jax.random.key(evaluate.SAMPLE_SEED), name, int(steps),
                            eta=float(eta), progress=False)
        print(json.dumps(dict(workdir=workdir, stage=stage, step=gen.step, sampler=name,
                              steps=int(steps), eta=float(eta), num=num,
                              fid=metrics.fid_from_features(real, feat_fn(x)),
                              confident=float(np.mean(probs_fn(x).max(-1) > 0.9)),
                              sample_s=time.time() - t)), flush=True)


if __name__ == "__main__":
    main()
