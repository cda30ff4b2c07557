import gzip
import hashlib
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from ldm_jax import data


def test_load_shapes_and_range():
    images, labels = data.load_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
    x = data.to_float(images[:10])
    assert x.shape == (10, 28, 28, 1) and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(data.to_uint8(x), images[:10])


@pytest.fixture
def data_copy(tmp_path):
    src = data.default_data_dir()
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    return tmp_path


def _rewrite(path, raw, md5sums_dir=None, name=None):
    with gzip.open(path, "wb") as f:
        f.write(raw)
    if md5sums_dir is not None:  # keep MD5SUMS consistent so a later check must catch it
        lines = open(md5sums_dir / "MD5SUMS").read().splitlines()
        lines = [f"{hashlib.md5(raw).hexdigest()}  {name}" if l.endswith(name) else l for l in lines]
        open(md5sums_dir / "MD5SUMS", "w").write("\n".join(lines) + "\n")


def test_wrong_md5_names_file(data_copy):
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.open(path).read())
    raw[100] ^= 1
    _rewrite(path, bytes(raw))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: MD5"):
        data.load_mnist("test", str(data_copy))


def test_truncated_gzip(data_copy):
    path = data_copy / "t10k-images-idx3-ubyte.gz"
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="not a complete gzip stream"):
        data.load_mnist("test", str(data_copy))


def test_wrong_magic(data_copy):
    name = "t10k-labels-idx1-ubyte"
    raw = bytearray(gzip.open(data_copy / f"{name}.gz").read())
    raw[:4] = struct.pack(">I", 2051)
    _rewrite(data_copy / f"{name}.gz", bytes(raw), data_copy, name)
    with pytest.raises(data.DataError, match="IDX magic is 2051, expected 2049"):
        data.load_mnist("test", str(data_copy))


def test_header_count_mismatch(data_copy):
    name = "t10k-labels-idx1-ubyte"
    raw = bytearray(gzip.open(data_copy / f"{name}.gz").read())
    raw[4:8] = struct.pack(">I", 9_999)
    _rewrite(data_copy / f"{name}.gz", bytes(raw), data_copy, name)
    with pytest.raises(data.DataError, match="header says"):
        data.load_mnist("test", str(data_copy))


def test_missing_file(data_copy):
    os.remove(data_copy / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: missing"):
        data.load_mnist("test", str(data_copy))


def test_batches_are_a_function_of_seed_and_step():
    a = [data.batch_indices(100, 10, seed=3, step=s) for s in range(20)]
    b = [data.batch_indices(100, 10, seed=3, step=s) for s in range(20)]
    np.testing.assert_array_equal(a, b)
    # One epoch covers every example once; the next epoch is a different order.
    np.testing.assert_array_equal(np.sort(np.concatenate(a[:10])), np.arange(100))
    assert not np.array_equal(np.concatenate(a[:10]), np.concatenate(a[10:]))
    assert not np.array_equal(a[0], data.batch_indices(100, 10, seed=4, step=0))


def test_batches_drawn_in_jit_equal_the_hosts():
    """The accelerator loop draws each batch inside the jitted step; the CPU loop on the
    host. Both must give the same indices, across epoch boundaries (10 batches per epoch)."""
    draw = jax.jit(lambda step: data.batch_indices_in_jit(105, 10, 3, step))
    for step in (0, 1, 9, 10, 11, 25):
        np.testing.assert_array_equal(np.asarray(draw(step)), data.batch_indices(105, 10, 3, step))
    # Runs begun before the jax shuffle keep numpy's, which is a different order.
    old = data.batch_indices(105, 10, 3, 0, shuffle="numpy")
    np.testing.assert_array_equal(old, np.random.default_rng([3, 0]).permutation(105)[:10])
    assert not np.array_equal(old, data.batch_indices(105, 10, 3, 0))


def test_process_slices_partition_the_global_batch():
    idx = data.batch_indices(1000, 64, seed=0, step=5)
    parts = [data.process_slice(idx, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), idx)
    with pytest.raises(data.DataError):
        data.process_slice(idx, 0, 3)
