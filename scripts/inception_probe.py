"""Inception FID, precision/recall and pixel statistics of one set of images, against a
cached reference: the README job's quality check (docs/results.md, "Sample quality").

    python scripts/inception_probe.py --ref=test            # cache the 10,000 test images' features
    python scripts/inception_probe.py --ref=test --npz=runs/demo/ldm_samples.npz --num=2000
    python scripts/inception_probe.py --ref=val --vae=runs/demo --num=2000   # VAE reconstructions
    python scripts/inception_probe.py --ref=test --real=2000  # the floor: N training images

--ref=val scores against the last --holdout training images (data.holdout; for choices),
--ref=test against the 10,000 test images (for reporting). --vae reconstructs the first N
images of the reference split. Precision/recall (k = 3) use N reference images. About 6 images/s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
from absl import app, flags

from ldm_jax import cli, data, metrics

FLAGS = flags.FLAGS
flags.DEFINE_enum("ref", "test", ["test", "val"], "Reference: the test set, or the holdout.")
flags.DEFINE_integer("holdout", 2000, "Size of the validation holdout (data.holdout).")
flags.DEFINE_string("npz", "", "Samples to score (an .npz with uint8 `images`).")
flags.DEFINE_string("vae", "", "A workdir whose VAE reconstructs the first --num reference images.")
flags.DEFINE_integer("real", 0, "Score this many training images (outside the holdout): the floor.")
flags.DEFINE_integer("num", 2000, "How many images to score.")


def split_images() -> np.ndarray:
    """uint8 [N, 28, 28]: the 10,000 test images, or the last --holdout training images."""
    if FLAGS.ref == "test":
        return data.load("package", "test")[0]
    return data.load("package", "train")[0][-FLAGS.holdout:]


def reference(which: str, holdout: int, feat_fn, weights: str) -> np.ndarray:
    """Inception features of the reference set, computed once and cached."""
    tag = hashlib.md5(open(weights, "rb").read(1 << 20)).hexdigest()[:8]
    name = f"inception_ref_{which}{holdout if which == 'val' else ''}_{tag}.npz"
    path = os.path.join(os.path.expanduser("~/.cache/ldm_jax"), name)
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            return z["features"]
    images = split_images()
    feats = feat_fn(images)
    np.savez(path + ".tmp.npz", features=feats)
    os.replace(path + ".tmp.npz", path)
    return feats


def images_to_score() -> tuple[str, np.ndarray] | None:
    if FLAGS.npz:
        with np.load(FLAGS.npz, allow_pickle=False) as z:
            return FLAGS.npz, z["images"][:FLAGS.num]
    if FLAGS.vae:
        import jax  # pylint: disable=import-outside-toplevel
        from ldm_jax import checkpoints, nets  # pylint: disable=import-outside-toplevel
        vae, variables, _, meta = checkpoints.load_vae(FLAGS.vae)
        x = data.to_float(split_images()[:FLAGS.num])
        rec = jax.jit(lambda v, b: vae.apply(v, b, method=nets.VAE.reconstruct)[0])
        out = np.concatenate([np.asarray(rec(variables, x[i:i + 500])) for i in range(0, len(x), 500)])
        return f"{FLAGS.vae}/vae step {meta['step']} reconstructions", data.to_uint8(out)
    if FLAGS.real:
        train = data.load("package", "train")[0][:-FLAGS.holdout]
        return f"{FLAGS.real} training images", train[:FLAGS.real]
    return None


def classifier_scores(images: np.ndarray) -> dict:
    """The fast proxy: the committed classifier's FID against the same reference split,
    and its recognisable share (top probability > 0.9)."""
    from ldm_jax import features  # pylint: disable=import-outside-toplevel
    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs = features.probabilities_fn(features.DEFAULT_PATH)(images)
    real = split_images()
    return dict(classifier_fid=metrics.fid_from_features(feat_fn(real), feat_fn(images)),
                recognisable=float(np.mean(probs.max(-1) > 0.9)))


def main(argv):
    del argv
    cli.setup_jax()
    from ldm_jax import inception  # pylint: disable=import-outside-toplevel
    weights = inception.default_weights_path()
    feat_fn = inception.make_feature_fn(inception.load_params(weights), batch_size=10)
    ref = reference(FLAGS.ref, FLAGS.holdout, feat_fn, weights)
    got = images_to_score()
    if got is None:
        print(f"cached {len(ref)} reference features")
        return
    name, images = got
    fake = feat_fn(images)
    real_n = ref[np.random.default_rng(0).permutation(len(ref))[:len(images)]]
    p, r = metrics.precision_recall(real_n, fake, k=3)
    row = dict(what=name, ref=FLAGS.ref, n=len(images), inception_fid=metrics.fid_from_features(ref, fake),
               precision=p, recall=r, **metrics.pixel_stats(images), **classifier_scores(images))
    print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
