"""Inception FID, precision/recall, pixel statistics and the classifier proxy of one set of
images against N reference images: the quality tables of docs/results.md ("Sample quality
on Inception features").

    python scripts/inception_probe.py --ref=test --npz=runs/demo/ldm_samples.npz   # samples
    python scripts/inception_probe.py --ref=test --vae=runs/demo      # the VAE's reconstructions
    python scripts/inception_probe.py --ref=test --real                # the floor: training images
    python scripts/inception_probe.py --ref=val --npz=...              # for choices

--ref=test: N of the 10,000 test images (drawn with seed 0), for reporting. --ref=val: the
last --holdout training images (data.holdout; the cpu-quick preset holds out 2,000), for
choosing defaults. --vae reconstructs those same reference images (rFID); --real takes N
training images outside the holdout. Reference features are cached. Inception runs on every
CPU device (cli.setup_jax), a few images/s on 2 cores.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from ldm_jax import cli, data, metrics

FLAGS = flags.FLAGS
flags.DEFINE_enum("ref", "test", ["test", "val"], "Reference: the test set, or the holdout.")
flags.DEFINE_integer("holdout", 2000, "Size of the validation holdout (data.holdout).")
flags.DEFINE_integer("num", 2000, "N: images scored and reference images.")
flags.DEFINE_string("npz", "", "Samples to score (an .npz with uint8 `images`).")
flags.DEFINE_string("vae", "", "A workdir whose VAE reconstructs the reference images.")
flags.DEFINE_bool("real", False, "Score N training images outside the holdout: the floor.")
flags.DEFINE_bool("inception", True, "--noinception: pixel statistics, MSE and the classifier "
                  "proxy only (seconds instead of minutes).")


def reference_images() -> np.ndarray:
    """uint8 [N, 28, 28]: N test images (seed 0), or the last --holdout training images."""
    if FLAGS.ref == "test":
        test = data.load("package", "test")[0]
        return test[np.random.default_rng(0).choice(len(test), FLAGS.num, replace=False)]
    return data.load("package", "train")[0][-FLAGS.holdout:][:FLAGS.num]


def sharded_feature_fn(batch: int = 20):
    """uint8 [N, 28, 28] -> Inception pool features [N, 2048], each batch split over the
    CPU devices (XLA:CPU runs one device's convolutions on about one core)."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
    from ldm_jax import inception  # pylint: disable=import-outside-toplevel
    mesh = jax.make_mesh((len(jax.devices()),), ("b",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("b"))
    params = jax.device_put(inception.load_params(), rep)
    model = inception.InceptionV3()
    fn = jax.jit(lambda p, x: model.apply({"params": p}, inception.preprocess(x, "tf")),
                 in_shardings=(rep, split), out_shardings=split)

    def features(images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.concatenate([images, np.zeros((-n % batch, 28, 28), np.uint8)])
        return np.concatenate([np.asarray(fn(params, jax.device_put(padded[i:i + batch], split)))
                               for i in range(0, len(padded), batch)])[:n]
    return features


def cached_reference(feat_fn) -> np.ndarray:
    name = f"inception_ref_{FLAGS.ref}{FLAGS.holdout if FLAGS.ref == 'val' else ''}_{FLAGS.num}.npz"
    path = os.path.join(os.path.expanduser("~/.cache/ldm_jax"), name)
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            return z["features"]
    feats = feat_fn(reference_images())
    np.savez(path + ".tmp.npz", features=feats)
    os.replace(path + ".tmp.npz", path)
    return feats


def sample_features(feat_fn, images: np.ndarray) -> np.ndarray:
    """Inception features of the scored images; for --npz kept beside it, so that scoring
    the same samples against the other split costs no second pass."""
    if not FLAGS.npz:
        return feat_fn(images)
    path = f"{FLAGS.npz[:-4]}_inception{len(images)}.npz"
    if os.path.isfile(path) and os.path.getmtime(path) > os.path.getmtime(FLAGS.npz):
        with np.load(path, allow_pickle=False) as z:
            return z["features"]
    feats = feat_fn(images)
    np.savez(path + ".tmp.npz", features=feats)
    os.replace(path + ".tmp.npz", path)
    return feats


def images_to_score() -> tuple[str, np.ndarray]:
    if FLAGS.npz:
        with np.load(FLAGS.npz, allow_pickle=False) as z:
            return FLAGS.npz, z["images"][:FLAGS.num]
    if FLAGS.vae:
        import jax  # pylint: disable=import-outside-toplevel
        from ldm_jax import checkpoints, nets  # pylint: disable=import-outside-toplevel
        vae, variables, _, meta = checkpoints.load_vae(FLAGS.vae)
        x = data.to_float(reference_images())
        rec = jax.jit(lambda v, b: vae.apply(v, b, method=nets.VAE.reconstruct)[0])
        out = np.concatenate([np.asarray(rec(variables, x[i:i + 500]))
                              for i in range(0, len(x), 500)])
        return f"{FLAGS.vae} VAE step {meta['step']}, reconstructions", data.to_uint8(out)
    train = data.load("package", "train")[0][:-FLAGS.holdout]
    pick = np.random.default_rng(1).choice(len(train), FLAGS.num, replace=False)
    return f"{FLAGS.num} training images", train[pick]


def classifier_scores(images: np.ndarray) -> dict:
    """The fast proxy: the committed classifier's FID against the same reference images,
    and its recognisable share (metrics.recognisable_share)."""
    from ldm_jax import features  # pylint: disable=import-outside-toplevel
    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs = features.probabilities_fn(features.DEFAULT_PATH)(images)
    return dict(classifier_fid=metrics.fid_from_features(feat_fn(reference_images()),
                                                         feat_fn(images)),
                recognisable=metrics.recognisable_share(probs))


def main(argv):
    del argv
    if not (FLAGS.npz or FLAGS.vae or FLAGS.real):
        raise app.UsageError("pass --npz, --vae or --real")
    cli.setup_jax()
    name, images = images_to_score()
    row = dict(what=name, ref=FLAGS.ref, n=len(images), **metrics.pixel_stats(images),
               **classifier_scores(images))
    if FLAGS.inception:
        feat_fn = sharded_feature_fn()
        ref, fake = cached_reference(feat_fn), sample_features(feat_fn, images)
        p, r = metrics.precision_recall(ref, fake, k=3)
        row.update(inception_fid=metrics.fid_from_features(ref, fake), precision=p, recall=r)
    if FLAGS.vae:  # MSE on the [0, 1] scale, of the uint8 reconstructions
        real = reference_images().reshape(len(images), -1)
        row["mse"] = float(np.mean((images.reshape(len(images), -1) / 255.0 - real / 255.0) ** 2))
    print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
