"""A float16 copy of the converted Inception weights, and what the rounding costs:
docs/results.md, "Accelerators" (the weights travel as float16; FID moves by 0.017).

    python scripts/half_inception.py --src=~/.cache/ldm_jax/inception_fid.npz --out=.inc/inception_fid_f16.npz
    python scripts/half_inception.py ... --check=300   # FID of N test vs N train images, both weights

The converted TF-FID InceptionV3 (`python -m ldm_jax.convert_inception`) is 87 MB of float32,
more than a 64 MiB transfer to a rented accelerator allows beside the repository. Storing
its kernels as float16 halves it; `inception.load_params` casts every array back to float32,
so only the weights are rounded, never the arithmetic. --check runs Inception on 2 x N
images twice (about 6 images/s on a 2-core CPU).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "The converted float32 weights (.npz; ~ expands).")
flags.DEFINE_string("out", None, "Where to write the float16 copy (.npz; ~ expands).")
flags.DEFINE_integer("check", 0, "Also compare FID of N test vs N train images under both "
                     "weights (0: no check).")
flags.mark_flag_as_required("src")
flags.mark_flag_as_required("out")


def halve(src: str, out: str) -> None:
    """Kernels (rank >= 2, over 4,096 weights) as float16; the rest (biases, batch-norm
    vectors, the small 1x1 kernels) stays float32."""
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    half = {k: a.astype(np.float16) if a.ndim >= 2 and a.size > 4096 else a for k, a in arrays.items()}
    for k, a in half.items():
        if not np.isfinite(a).all():
            raise ValueError(f"{k} does not fit float16")
    np.savez(out, **half)
    err = max(float(np.abs(half[k].astype(np.float32) - a).max() / np.abs(a).max())
              for k, a in arrays.items() if half[k].dtype == np.float16)
    print(f"wrote {out}; largest rounding error relative to its tensor's largest weight: {err:.2e}")


def check(src: str, out: str, n: int) -> None:
    from ldm_jax import data, inception, metrics  # pylint: disable=import-outside-toplevel
    test, _ = data.load("package", "test")
    train, _ = data.load("package", "train")
    rng = np.random.default_rng(0)
    a = test[rng.choice(len(test), n, replace=False)]
    b = train[rng.choice(len(train), n, replace=False)]
    feats = {}
    for name, path in (("float32", src), ("float16", out)):
        t = time.time()
        fn = inception.make_feature_fn(inception.load_params(path), batch_size=10)
        feats[name] = fn(a), fn(b)
        print(f"{name} weights: FID {n} test vs {n} train images "
              f"{metrics.fid_from_features(*feats[name]):.4f} ({time.time() - t:.0f} s)")
    diff = np.abs(feats["float16"][0] - feats["float32"][0])
    print(f"features: mean |diff| {diff.mean():.2e}, mean |feature| {np.abs(feats['float32'][0]).mean():.2e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    src, out = os.path.expanduser(FLAGS.src), os.path.expanduser(FLAGS.out)
    halve(src, out)
    if FLAGS.check:
        check(src, out, FLAGS.check)


if __name__ == "__main__":
    app.run(main)
