"""N samples of an LDM at DDIM-50, eta 1, autoguidance W (seed 7), a 100-sample grid, and the fast
metrics: classifier FID against the 10,000 test images, recognisable share, pixel statistics.

    python scripts/quick_samples.py WORKDIR W N
"""
import json, sys, time, numpy as np, jax
from ldm_jax import cli; cli.setup_jax()
from ldm_jax import sample, features, evaluate, metrics, data
W = sys.argv[1]; w = float(sys.argv[2])
gen = sample.load_generator(W, "ldm")
t = time.time()
x = sample.generate(gen, int(sys.argv[3]), jax.random.key(7), "ddim", 50, 1.0, batch_size=250, progress=False, autoguidance=w)
dt = time.time() - t
np.savez(f"{W}/samples_w{w:g}.npz", images=x)
sample.save_grid(x[:100], f"{W}/grid_w{w:g}.png")
feat = features.feature_fn(features.DEFAULT_PATH); probs = features.probabilities_fn(features.DEFAULT_PATH)
real = evaluate.reference_features(feat, features.DEFAULT_PATH)
p = probs(x)
print(json.dumps(dict(w=w, sample_s=round(dt,1), classifier_fid_test10k=metrics.fid_from_features(real, feat(x)),
      recognisable=float(np.mean(p.max(-1) > 0.9)), classes=np.bincount(p.argmax(-1), minlength=10).tolist(),
      **metrics.pixel_stats(x), real=metrics.pixel_stats(data.load("package","test")[0]))))
