"""MNIST, shipped with the package and verified on every load.

The four canonical IDX files live in `ldm_jax/mnist/` (gzip-compressed, as
distributed by LeCun, Cortes and Burges, CC BY-SA 3.0). Every load checks the
gzip stream, the MD5 of the uncompressed bytes against `MD5SUMS`, the IDX magic
and the header, and names the file and the failed check when one fails.

Batches are a pure function of (seed, step): resuming at step s sees exactly the
batches an uninterrupted run would, and each process of a multi-host run takes
its own contiguous slice of every global batch. Each epoch's shuffle is
jax.random's permutation, so the host (`batch_indices`) and a jitted step
(`batch_indices_in_jit`, the accelerator loop) draw the same batches; runs begun
before 2026-11-26 evening shuffled with numpy (SHUFFLES[1]) and resume with it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_TRAIN_IMAGES = 60_000


class DataError(ValueError):
    """A data file is missing or fails a check; the message names file and check."""


def default_data_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist")


def read_md5sums(data_dir: str) -> dict[str, str]:
    path = os.path.join(data_dir, "MD5SUMS")
    if not os.path.exists(path):
        raise DataError(f"{path}: missing (it lists the MD5 of each uncompressed IDX file)")
    sums = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                fields = line.split()
                if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", fields[0]):
                    raise DataError(f"{path}:{n}: expected 'MD5 NAME', got {line.strip()!r}")
                sums[fields[1].removeprefix("*")] = fields[0]  # md5sum -b writes *NAME
    return sums


def trained_on(data_cfg) -> int:
    """How many leading MNIST training images a stage with data config data_cfg trains on
    (stages.train_split keeps all but the last data.holdout, then the first max_examples)."""
    keep = MNIST_TRAIN_IMAGES - data_cfg.get("holdout", 0)
    return min(keep, data_cfg.get("max_examples", 0) or keep)


def read_idx(path: str, magic: int, md5: str) -> np.ndarray:
    """Reads one gzip IDX file into a uint8 array, after checking every byte."""
    if not os.path.exists(path):
        raise DataError(f"{path}: missing")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a complete gzip stream ({e})") from None
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise DataError(f"{path}: MD5 of the uncompressed bytes is {got}, expected {md5}")
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    found, count = struct.unpack(">II", raw[:8])
    if found != magic:
        raise DataError(f"{path}: IDX magic is {found}, expected {magic}")
    dims = (count,)
    offset = 8
    if magic == IMAGE_MAGIC:
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (28, 28):  # every model here is built for MNIST's 28x28
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28 (MNIST)")
        dims, offset = (count, rows, cols), 16
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 28, 28], labels uint8 [N]) of 'train' or 'test'."""
    if split not in FILES:
        raise DataError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    data_dir = data_dir or default_data_dir()
    sums = read_md5sums(data_dir)
    image_name, label_name = FILES[split]
    if missing := [name for name in FILES[split] if name not in sums]:
        raise DataError(f"{data_dir}/MD5SUMS: no MD5 for {', '.join(missing)}")
    images = read_idx(os.path.join(data_dir, image_name + ".gz"), IMAGE_MAGIC, sums[image_name])
    labels = read_idx(os.path.join(data_dir, label_name + ".gz"), LABEL_MAGIC, sums[label_name])
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def load_mnist_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The same arrays from tensorflow-datasets (optional extra `ldm_jax[tfds]`)."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise DataError("data.source=tfds needs `pip install ldm_jax[tfds]`") from None
    ds = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1))
    return ds["image"][..., 0].astype(np.uint8), ds["label"].astype(np.uint8)


def load(source: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    if source == "package":
        return load_mnist(split, data_dir)
    if source == "tfds":
        return load_mnist_tfds(split)
    raise DataError(f"unknown data source {source!r}; use 'package' or 'tfds'")


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 28, 28, 1] in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0)[..., None]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [N, 28, 28, 1] in [-1, 1] -> uint8 [N, 28, 28], rounded and clipped."""
    x = np.asarray(x, dtype=np.float32).reshape(x.shape[0], 28, 28)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


SHUFFLES = ("jax", "numpy")  # new runs, and runs that began before the jax shuffle


def epoch_permutation(num_examples: int, seed, epoch) -> jax.Array:
    """One epoch's shuffle of range(num_examples), from (seed, epoch); traceable."""
    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), num_examples)


def _per_epoch(num_examples: int, batch_size: int) -> int:
    if num_examples < batch_size:
        raise DataError(f"batch size {batch_size} is larger than the {num_examples} examples")
    return num_examples // batch_size


def batch_indices_in_jit(num_examples: int, batch_size: int, seed, step) -> jax.Array:
    """batch_indices(..., shuffle='jax') for a traced step: the global batch's indices
    drawn inside a jitted train step (the epoch's permutation is recomputed each step:
    a sort of num_examples keys, small beside a U-Net step on an accelerator)."""
    epoch, i = jnp.divmod(step, _per_epoch(num_examples, batch_size))
    perm = epoch_permutation(num_examples, seed, epoch)
    return jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int,
                  shuffle: str = "jax") -> np.ndarray:
    """Indices of the global batch for `step`: epoch-wise shuffles drawn from (seed, epoch)
    by jax.random (or, for runs begun before it, numpy)."""
    epoch, i = divmod(step, _per_epoch(num_examples, batch_size))
    perm = _permutation(num_examples, seed, epoch, shuffle)
    return perm[i * batch_size:(i + 1) * batch_size]


_jit_permutation = jax.jit(epoch_permutation, static_argnums=0)


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int, shuffle: str) -> np.ndarray:
    """One epoch's shuffle, drawn once per epoch rather than once per step."""
    if shuffle == "jax":
        with jax.ensure_compile_time_eval():  # concrete even when called inside a jit trace
            perm = np.array(_jit_permutation(num_examples, seed, epoch))
    elif shuffle == "numpy":
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    else:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    perm.flags.writeable = False
    return perm


def process_slice(global_indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous share of a global batch (equal shares)."""
    n = len(global_indices)
    if n % process_count:
        raise DataError(f"global batch {n} does not split over {process_count} processes")
    per = n // process_count
    return global_indices[process_index * per:(process_index + 1) * per]
