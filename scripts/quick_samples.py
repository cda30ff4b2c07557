"""N samples of an LDM at DDIM-50, eta 1, autoguidance W (seed 7), a 100-sample grid, and the
fast metrics: classifier FID against the 10,000 test images, recognisable share, class counts,
pixel statistics. Reproduces docs/results.md, "The README job's LDM on the Bernoulli first stage".

    python scripts/quick_samples.py WORKDIR W N
"""
import json
import sys
import time

import jax
import numpy as np

from ldm_jax import cli, data, evaluate, features, metrics, sample


def main() -> None:
    workdir, w, num = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    cli.setup_jax()
    gen = sample.load_generator(workdir, "ldm")
    start = time.time()
    x = sample.generate(gen, num, jax.random.key(7), "ddim", 50, 1.0, batch_size=250,
                        progress=False, autoguidance=w)
    seconds = time.time() - start
    np.savez(f"{workdir}/samples_w{w:g}.npz", images=x)
    sample.save_grid(x[:100], f"{workdir}/grid_w{w:g}.png")
    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs = features.probabilities_fn(features.DEFAULT_PATH)(x)
    real = evaluate.reference_features(feat_fn, features.DEFAULT_PATH)
    print(json.dumps(dict(
        w=w, sample_s=round(seconds, 1), recognisable=float(np.mean(probs.max(-1) > 0.9)),
        classifier_fid_test10k=metrics.fid_from_features(real, feat_fn(x)),
        classes=np.bincount(probs.argmax(-1), minlength=10).tolist(), **metrics.pixel_stats(x),
        real=metrics.pixel_stats(data.load("package", "test")[0]))))


if __name__ == "__main__":
    main()
