"""Inception FID, precision/recall, pixel statistics and the classifier proxy of one set of
images against the validation split and the test set (score.SplitScorer): the quality tables
of docs/results.md.

    python scripts/inception_probe.py --npz=runs/demo/ldm_samples.npz   # samples
    python scripts/inception_probe.py --vae=runs/demo     # the VAE's reconstructions (rFID)
    python scripts/inception_probe.py --real              # the floor: training images
    python scripts/inception_probe.py --splits=val ...    # choosing: the holdout only

val: the last --holdout training images (data.holdout; the cpu-quick preset holds out 2,000),
for choosing defaults; test: the 10,000 test images, for reporting. --vae reconstructs the
first --num images of --recon_split (fid_originals: the originals' own FID, rFID's floor);
--real takes --num training images outside the holdout.
Reference and scored images' features are cached (score.cached_features).
Inception runs on every CPU device (cli.setup_jax), a few images/s on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from ldm_jax import cli, data, metrics, score

FLAGS = flags.FLAGS
flags.DEFINE_list("splits", list(score.SPLITS), "References: val (the holdout), test.")
flags.DEFINE_integer("holdout", 2000, "Size of the validation holdout (data.holdout).")
flags.DEFINE_integer("max_ref", 0, "Only the first MAX_REF images of each split (0: all).")
flags.DEFINE_integer("num", 2000, "N: the images scored.")
flags.DEFINE_string("npz", "", "Samples to score (an .npz with uint8 `images`).")
flags.DEFINE_string("vae", "", "A workdir whose VAE reconstructs --num images of --recon_split.")
flags.DEFINE_enum("recon_split", "test", list(score.SPLITS), "Whose images --vae reconstructs.")
flags.DEFINE_bool("real", False, "Score N training images outside the holdout: the floor.")
flags.DEFINE_bool("inception", True, "--noinception: pixel statistics, MSE and the classifier "
                  "proxy only (seconds instead of minutes).")


def images_to_score() -> tuple[str, np.ndarray, np.ndarray | None]:
    """(what, uint8 images, the originals they reconstruct or None)."""
    if FLAGS.npz:
        with np.load(FLAGS.npz, allow_pickle=False) as z:
            return FLAGS.npz, z["images"][:FLAGS.num], None
    if FLAGS.vae:
        from ldm_jax import checkpoints  # pylint: disable=import-outside-toplevel
        if "val" in FLAGS.splits or FLAGS.recon_split == "val":
            score.require_val_unseen(FLAGS.vae, ["vae"], FLAGS.holdout, "inception_probe")
        first_stage = checkpoints.load_vae(FLAGS.vae)
        originals = score.split_images(FLAGS.recon_split, FLAGS.holdout)[:FLAGS.num]
        recons = data.to_uint8(score.reconstruct(first_stage, originals)[0])
        return (f"{FLAGS.vae} VAE step {first_stage[3]['step']}, reconstructions of "
                f"{FLAGS.recon_split}[:{FLAGS.num}]", recons, originals)
    return f"{FLAGS.num} training images", score.floor_images(FLAGS.num, FLAGS.holdout), None


def main(argv):
    del argv
    if not (FLAGS.npz or FLAGS.vae or FLAGS.real):
        raise app.UsageError("pass --npz, --vae or --real")
    cli.setup_jax()
    name, images, originals = images_to_score()
    scorer = score.SplitScorer(FLAGS.splits, FLAGS.holdout, FLAGS.max_ref, FLAGS.inception)
    # Kept in the cache, so that scoring the same images again costs no second Inception pass.
    feats = score.cached_features(scorer.inc, images, f"{scorer.inc_tag}_scored") if scorer.inc else None
    row = dict(what=name, n=len(images), **scorer(images, feats))
    if originals is not None:  # MSE on the [0, 1] scale, of the uint8 reconstructions
        row["mse"] = float(np.mean((images / 255.0 - originals / 255.0) ** 2))
        ref, ref_stats = scorer.inc_refs.get(FLAGS.recon_split, ((), None))
        if len(ref) >= len(images):  # the originals' own FID: a perfect reconstruction's
            originals_stats = metrics.feature_stats(ref[:len(images)])
            row["fid_originals"] = float(metrics.frechet_distance(*ref_stats, *originals_stats))
    print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
