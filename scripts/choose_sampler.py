"""Choose a generator's sampling setting on the validation split by Inception FID, and
report every setting on the test set: docs/results.md, "Samplers and guidance".

    python scripts/choose_sampler.py --workdir=W --stages=ldm,pixel --settings=0:1,2:1,2:0 --out=F.jsonl
    python scripts/choose_sampler.py ... --final_num=10000   # the chosen setting again at 10k
    python scripts/choose_sampler.py --npz=name:path.npz ...  # also score samples drawn elsewhere

Each setting is W:ETA, DDIM-50 with autoguidance weight W and eta ETA, --num samples (seed 7).
Each is scored by score.SplitScorer against the validation images (the last --holdout training
images, which the cpu-quick preset never trains on) and the 10,000 test images: Inception FID,
precision/recall (k = 3), the classifier's FID and recognisable share, pixel statistics.
The floor row scores --num training images from outside the holdout the same way. For each
stage the setting with the lowest validation FID is chosen; --final_num draws it again (seed 8)
and scores it the same way; report its test columns. One JSON line per row; --save keeps every
sample drawn. Inception needs an accelerator to be quick (about 6 images/s on 2 CPU cores).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags, logging

from ldm_jax import cli, sample, score

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "Workdir of the generator (empty: score --npz only).")
flags.DEFINE_list("stages", ["ldm"], "Generators in --workdir to sample: ldm, pixel.")
flags.DEFINE_list("settings", [], "W:ETA pairs (autoguidance weight, DDIM eta).")
flags.DEFINE_list("npz", [], "name:path pairs of sample files (uint8 `images`) to score too.")
flags.DEFINE_integer("num", 2000, "Samples per setting (and training images in the floor).")
flags.DEFINE_integer("final_num", 0, "Draw the chosen setting again at this N (0: no).")
flags.DEFINE_integer("holdout", 2000, "The validation images: the last HOLDOUT training images.")
flags.DEFINE_integer("max_ref", 0, "Use only this many reference images per split (0: all; for tests).")
flags.DEFINE_string("save", "", "Save every sample drawn here (compressed .npz, a key per row).")
flags.DEFINE_string("out", "", "Append the JSON lines here too.")


def emit(name: str, images: np.ndarray, scorer: score.SplitScorer, **extra) -> dict:
    """One row, printed and appended to --out: scorer's metrics of images under name."""
    row = dict(what=name, n=len(images), **extra, **scorer(images))
    print(json.dumps(row), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def draw(gen, num: int, w: float, eta: float, seed: int) -> tuple[np.ndarray, float]:
    start = time.time()
    x = sample.generate(gen, num, jax.random.key(seed), "ddim", 50, eta, batch_size=1000,
                        progress=False, autoguidance=w)
    return x, time.time() - start


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # no Orbax restore chatter between the rows
    cli.setup_jax()
    if FLAGS.workdir:
        score.require_val_unseen(FLAGS.workdir, FLAGS.stages, FLAGS.holdout, "choose_sampler")
    scorer = score.SplitScorer(score.SPLITS, FLAGS.holdout, FLAGS.max_ref)
    emit(f"real: {FLAGS.num} training images", score.floor_images(FLAGS.num, FLAGS.holdout),
         scorer)
    for item in FLAGS.npz:
        name, path = item.split(":", 1)
        with np.load(path, allow_pickle=False) as z:
            emit(name, z["images"][:FLAGS.num], scorer)
    saved = {}
    for stage in FLAGS.stages if FLAGS.workdir else []:
        saved.update(sweep(stage, scorer))
    if FLAGS.save:
        np.savez_compressed(FLAGS.save, **saved)


def sweep(stage: str, scorer: score.SplitScorer) -> dict:
    """Every setting of one stage against both splits; the val-chosen one again at final_num."""
    gen = sample.load_generator(FLAGS.workdir, stage)
    rows, saved = [], {}
    for setting in FLAGS.settings:
        w, eta = (float(v) for v in setting.split(":"))
        x, seconds = draw(gen, FLAGS.num, w, eta, seed=7)
        saved[f"{stage}_w{w:g}_eta{eta:g}"] = x
        rows.append(emit(f"{stage} w={w:g} eta={eta:g}", x, scorer,
                         w=w, eta=eta, sample_s=round(seconds, 1)))
    best = min(rows, key=lambda r: r["fid_val"])
    print(json.dumps(dict(stage=stage, chosen_on_val=best["what"])), flush=True)
    if FLAGS.final_num:
        x, seconds = draw(gen, FLAGS.final_num, best["w"], best["eta"], seed=8)
        saved[f"{stage}_chosen"] = x
        emit(f"chosen {best['what']}", x, scorer, w=best["w"], eta=best["eta"],
             sample_s=round(seconds, 1))
    return saved


if __name__ == "__main__":
    app.run(main)
