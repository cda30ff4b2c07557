"""The project's MNIST feature network: the committed classifier, as features and labels.

Every MNIST-FID, precision/recall and conditional accuracy the project reports uses the
same weights, `ldm_jax/assets/classifier.npz` (flat 'a/b/c' keys, loaded with
allow_pickle=False). They come from `python -m ldm_jax.train --stage=classifier` and

    python -m ldm_jax.features --workdir=runs/clf --out=ldm_jax/assets/classifier.npz

which copies the EMA parameters of that run and records its test accuracy in the file.
"""

from __future__ import annotations

import os
import sys
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax import checkpoints, cli, configs, data, nets

Array = jax.Array

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "classifier.npz")
META_KEYS = ("meta/feature_dim", "meta/test_accuracy", "meta/step")


def save_classifier(params, path: str, feature_dim: int, test_accuracy: float, step: int) -> None:
    flat = {"/".join(k): np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    flat.update({"meta/feature_dim": np.int64(feature_dim),
                 "meta/test_accuracy": np.float64(test_accuracy), "meta/step": np.int64(step)})
    np.savez(path, **flat)


class ClassifierError(ValueError):
    """A classifier file that is not an exported classifier; the message is one line."""


def load_classifier(path: str | None = None) -> tuple[nets.Classifier, dict, dict]:
    """(model, params, meta) from an exported npz; never unpickles. Raises
    FileNotFoundError if there is no file, ClassifierError if it is not an npz holding
    exactly the parameters nets.Classifier expects (names and shapes)."""
    path = path or DEFAULT_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights not found at {path}; train one with "
                                "`python -m ldm_jax.train --stage=classifier` and export it "
                                "with `python -m ldm_jax.features`")
    if not zipfile.is_zipfile(path):  # np.load would read anything else as one .npy array
        raise ClassifierError(f"{path} is not an .npz file of classifier weights")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = {k.split("/", 1)[1]: npz[k].item() for k in META_KEYS if k in npz.files}
            flat = {tuple(k.split("/")): jnp.asarray(npz[k]) for k in npz.files
                    if not k.startswith("meta/")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClassifierError(f"{path} is not a classifier npz: {reason}") from None
    bad = sorted("/".join(k) for k, v in flat.items() if not np.isfinite(np.asarray(v)).all())
    if bad:  # NaN weights give NaN features, which FID and PRDC would report as a score
        raise ClassifierError(f"{path} holds non-finite weights ({len(bad)} array(s), first: "
                              f"{bad[0]})")
    model = nets.Classifier(feature_dim=int(meta.get("feature_dim", 128)))
    expected = traverse_util.flatten_dict(jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
    got = {k: v.shape for k, v in flat.items()}
    want = {k: v.shape for k, v in expected.items()}
    if got != want:
        missing = sorted("/".join(k) for k in set(want) - set(got))
        extra = sorted("/".join(k) for k in set(got) - set(want))
        shape = sorted("/".join(k) for k in set(got) & set(want) if got[k] != want[k])
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                else f"{shape[0]} has shape {got[tuple(shape[0].split('/'))]}, expected "
                f"{want[tuple(shape[0].split('/'))]}")
        raise ClassifierError(f"{path} does not hold the MNIST classifier's parameters ({what})")
    return model, traverse_util.unflatten_dict(flat), meta


def _batched(fn, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [N, 28, 28] -> fn over fixed-size zero-padded batches (one compilation)."""
    jitted = jax.jit(fn)

    def apply(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise ValueError(f"expected uint8 [N, 28, 28] images, got {images.dtype} {images.shape}")
        out = []
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, 28, 28), np.uint8)])
            out.append(np.asarray(jitted(data.to_float(chunk)))[:batch - pad])
        out = np.concatenate(out)
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            raise ClassifierError("the feature classifier returned non-finite values")
        return out
    return apply


def feature_fn(path: str | None = None, batch: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, 28, 28] -> penultimate-layer features [N, feature_dim] (float32)."""
    model, params, _ = load_classifier(path)
    return _batched(lambda x: model.apply({"params": params}, x, method=nets.Classifier.features),
                    batch)


def predict_fn(path: str | None = None, batch: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, 28, 28] -> predicted labels [N] (int)."""
    model, params, _ = load_classifier(path)
    return _batched(lambda x: jnp.argmax(model.apply({"params": params}, x), -1), batch)


def probabilities_fn(path: str | None = None, batch: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, 28, 28] -> class probabilities [N, 10] (the 'recognisable' share is
    the fraction whose largest probability exceeds 0.9)."""
    model, params, _ = load_classifier(path)
    return _batched(lambda x: jax.nn.softmax(model.apply({"params": params}, x), -1), batch)


def perceptual_distance(acts_x: list[Array], acts_y: list[Array], eps: float = 1e-8) -> Array:
    """LPIPS-style distance (Zhang et al. 2018, without learned layer weights) between two
    lists of activations [B, H, W, C]: per layer, unit-normalise over channels, take the
    squared difference summed over channels and averaged over positions; sum the layers.
    Returns [B]; 0 exactly when every activation matches."""
    def unit(a):
        return a / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True) + eps)
    return sum(jnp.mean(jnp.sum(jnp.square(unit(a) - unit(b)), -1), axis=(1, 2))
               for a, b in zip(acts_x, acts_y))


def perceptual_loss_fn(path: str | None = None) -> Callable[[Array, Array], Array]:
    """(x [B, 28, 28, 1], y [B, 28, 28, 1], both in [-1, 1]) -> [B] perceptual distances on
    the committed classifier's conv activations; the classifier is frozen (no gradient to
    its weights, gradients flow to the images)."""
    # Decision: this is the network behind the classifier FID, so a VAE trained
    # with it is scored by what it optimised; evaluate says so beside such numbers.
    model, params, _ = load_classifier(path)
    params = jax.lax.stop_gradient(params)

    def acts(x):
        return model.apply({"params": params}, x, method=nets.Classifier.activations)
    return lambda x, y: perceptual_distance(acts(x), acts(y))


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Workdir of a finished classifier run.", flag_values=fv)
    flags.DEFINE_string("out", None, "Where to write the npz (must not exist).", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    prog = "ldm_jax.features"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags)
    try:
        cli.require(fv, "workdir", "out")
        cli.check_workdir(fv.workdir, must_exist=True, writable=False)
        if os.path.exists(fv.out):
            raise cli.UsageError(f"{fv.out} exists; remove it first to replace the weights")
        cli.check_out_path(fv.out, suffix=".npz", siblings=())  # np.savez would append .npz
        restored = checkpoints.load_checkpoint(os.path.join(fv.workdir, "classifier"))
        if restored is None:
            raise configs.ConfigError(f"no trained classifier in {fv.workdir}/classifier")
        params, cfg, meta = restored
        if not meta.get("finished"):
            raise configs.ConfigError(f"the classifier in {fv.workdir} has not finished training")
    except (cli.UsageError, configs.ConfigError) as e:
        cli.fail(prog, e)
    save_classifier(params, fv.out, cfg["model"]["feature_dim"], meta["test_accuracy"],
                    meta["step"])
    print(f"wrote {fv.out} (test accuracy {meta['test_accuracy']:.4f}, step {meta['step']})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
