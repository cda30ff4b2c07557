"""Scoring images against real MNIST: the one place evaluate, the notebook and scripts/ get
their quality metrics from.

    ref = score.Reference(features.DEFAULT_PATH, num=2000)
    row = ref.score(images)          # FID, PRDC, recognisable, class KL, pixel statistics
    fids = ref.inception_fid({"ldm": images})   # InceptionV3 features, with the floor
    row = score.SplitScorer()(images)    # against the holdout (val) and the test set

FID uses all 10,000 test images; PRDC and Inception FID use N of them drawn at seed 0; the
floor is N training images scored as if they were samples.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import checkpoints, cli, data, features, inception, metrics, nets

QUALITY = ("fid", "precision", "recall", "density", "coverage")
COVERAGE = ("recognisable", "class_kl")  # metrics.class_coverage, on the classifier's probabilities
SPLITS = ("val", "test")  # choose on val (the holdout), report on test
PIXELS = ("zero", "haze", "saturated")  # metrics.pixel_stats: exact 0, levels 1-15, above 250
RECOGNISABLE = metrics.RECOGNISABLE  # the one threshold, defined beside recognisable_share
FLOOR = "real (train vs test)"  # the row of N training images scored as samples
# What reading a cut-off or garbled .npz raises: such a cache is treated as absent.
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
# Decision: a perceptual loss on the FID classifier is allowed, and said beside
# every classifier number it flatters (prefer the Inception FID for such a VAE).
PERCEPTUAL_NOTE = ("this VAE was trained with a perceptual loss on the same classifier's "
                   "features that the classifier FID, rFID and PRDC use, which flatters them; "
                   "compare with --inception")


def cache_dir() -> str:
    d = os.environ.get("LDM_JAX_CACHE_DIR", os.path.expanduser("~/.cache/ldm_jax"))
    os.makedirs(d, exist_ok=True)
    return d


def reference_features(feat_fn, classifier_path: str) -> np.ndarray:
    """Classifier features of the 10,000 MNIST test images, computed once and cached
    (keyed by the classifier file's MD5)."""
    with open(classifier_path, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()[:12]
    return cached_features(feat_fn, data.load("package", "test")[0], f"mnist_test_features_{digest}")


def quality(real_all: np.ndarray, real_n: np.ndarray, fake: np.ndarray) -> dict:
    """FID against all test features; PRDC against N test features."""
    out = {"fid": metrics.fid_from_features(real_all, fake)}
    out.update(metrics.prdc(real_n, fake, k_pr=3, k_dc=5))
    return {k: float(out[k]) for k in QUALITY}


def inception_feature_fn():
    """uint8 [N, 28, 28] -> InceptionV3 pool features; FileNotFoundError without weights."""
    # Batches of 10 per CPU device keep the memory low; an accelerator wants bigger ones.
    batch = 10 * jax.local_device_count() if jax.default_backend() == "cpu" else 256
    return inception.make_feature_fn(inception.load_params(), batch_size=batch)


def inception_weights_digest() -> str:
    """MD5 prefix of the Inception weights file ('none' without it): cached reference
    features depend on the weights, so their cache names carry it."""
    path = inception.default_weights_path()
    if not os.path.isfile(path):
        return "none"
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def cached_features(feat_fn, images: np.ndarray, name: str) -> np.ndarray:
    """feat_fn(images), kept in cache_dir() under name and the images' MD5, for reference
    sets that many runs score against (Inception: minutes on a CPU)."""
    digest = hashlib.md5(np.ascontiguousarray(images).tobytes()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"{name}_{len(images)}_{digest}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["features"]
        except UNREADABLE:  # a cut-off cache is no cache: compute it again
            pass
    feats = feat_fn(images)
    with cli.atomic_output(path) as f:
        np.savez(f, features=feats)
    return feats


def check_holdout(holdout: int) -> None:
    """Raises ValueError unless the val split is a real part of the training images
    (train[-0:] would be all of them)."""
    if not 0 < holdout < data.MNIST_TRAIN_IMAGES:
        raise ValueError(f"holdout must be in [1, {data.MNIST_TRAIN_IMAGES - 1}], got {holdout}")


def check_val_unseen(cfg: dict, holdout: int, where: str) -> None:
    """Raises ValueError if the model of stored config cfg trained on the last `holdout`
    training images: its val scores would be of its own training data."""
    check_holdout(holdout)
    if (n := data.trained_on(cfg["data"])) > data.MNIST_TRAIN_IMAGES - holdout:
        unseen = data.MNIST_TRAIN_IMAGES - n
        hint = f"; pass --holdout={unseen} or less" if unseen > 0 else ""
        raise ValueError(f"{where} trained on the first {n:,} training images, including the "
                         f"last {holdout:,} (the val split){hint}")


def require_val_unseen(workdir: str, stages: list[str], holdout: int, prog: str) -> None:
    """check_val_unseen for a script, on the stored config of each stage in workdir and of
    the VAE under a latent model: its one line, exit 2."""
    stages = list(stages) + (["vae"] if set(stages) & {"ldm", "distill"} else [])
    try:
        for stage in stages:
            if (cfg := checkpoints.stored_config(os.path.join(workdir, stage))) is not None:
                check_val_unseen(cfg, holdout, os.path.join(workdir, stage))
    except ValueError as e:
        cli.fail(prog, e)


def split_images(split: str, holdout: int) -> np.ndarray:
    """uint8 reference images of a split: 'val', the last `holdout` training images (which
    data.holdout never trains on), for choosing; 'test', the 10,000 test images, for reporting."""
    if split not in SPLITS:
        raise ValueError(f"split must be {'|'.join(SPLITS)}, got {split!r}")
    if split == "val":
        check_holdout(holdout)
    return data.load("package", "train")[0][-holdout:] if split == "val" else \
        data.load("package", "test")[0]


def floor_images(num: int, holdout: int) -> np.ndarray:
    """num training images from outside the holdout (seed 1): real data scored as samples."""
    if not 0 <= holdout < data.MNIST_TRAIN_IMAGES:  # 0: every training image
        raise ValueError(f"holdout must be in [0, {data.MNIST_TRAIN_IMAGES - 1}], got {holdout}")
    train = data.load("package", "train")[0][:-holdout or None]
    return train[np.random.default_rng(1).choice(len(train), num, replace=False)]


class SplitScorer:
    """The protocol of the scripts that choose defaults: images scored against the validation
    split and the test set by Inception FID and precision/recall (k = 3, against as many
    reference images as samples, drawn at seed 0), the classifier's FID against each split,
    its recognisable share and pixel statistics. Row keys end in _val and _test."""

    def __init__(self, splits=SPLITS, holdout: int = 2000, max_ref: int = 0,
                 with_inception: bool = True):
        refs = {s: split_images(s, holdout)[:max_ref or None] for s in splits}
        self.cls = features.feature_fn(features.DEFAULT_PATH)
        self.prob = features.probabilities_fn(features.DEFAULT_PATH)
        self.cls_refs = {s: self.cls(x) for s, x in refs.items()}
        self.inc, self.inc_refs = None, {}  # split -> (Inception features, their mean and covariance)
        if with_inception:
            self.inc, self.inc_tag = inception_feature_fn(), f"inception{inception_weights_digest()}"
            for s, x in refs.items():
                f = cached_features(self.inc, x, f"{self.inc_tag}_{s}")
                self.inc_refs[s] = (f, metrics.feature_stats(f))

    def __call__(self, images: np.ndarray, inception_features: np.ndarray | None = None) -> dict:
        row = {}
        if self.inc_refs:
            fake = self.inc(images) if inception_features is None else inception_features
            stats = metrics.feature_stats(fake)
            for split, (ref, ref_stats) in self.inc_refs.items():
                p, r = metrics.precision_recall(
                    ref[np.random.default_rng(0).permutation(len(ref))[:len(fake)]], fake, k=3)
                row.update({f"fid_{split}": metrics.frechet_distance(*ref_stats, *stats),
                            f"precision_{split}": p, f"recall_{split}": r})
        mine = self.cls(images)
        row.update({f"classifier_fid_{s}": metrics.fid_from_features(ref, mine)
                    for s, ref in self.cls_refs.items()})
        row["recognisable"] = metrics.recognisable_share(self.prob(images))
        return {k: float(v) for k, v in {**row, **metrics.pixel_stats(images)}.items()}


class Reference:
    """What images are scored against: the classifier's features of all test images, and
    N test and N training images (the real-vs-real floor), drawn at a fixed seed. Inception
    features of the N test and training images are computed once, when first asked for."""

    def __init__(self, classifier: str, num: int):
        self.feat_fn = features.feature_fn(classifier)
        self.real_all = reference_features(self.feat_fn, classifier)
        self.prob_fn = features.probabilities_fn(classifier)
        self.test_images, self.test_labels = data.load("package", "test")
        train_images, _ = data.load("package", "train")
        rng = np.random.default_rng(0)
        self.test_idx = rng.choice(len(self.test_images), min(num, len(self.test_images)),
                                   replace=False)
        self.test_n = self.test_images[self.test_idx]
        self.train_n = train_images[rng.choice(len(train_images), num, replace=False)]
        self.real_n = self.feat_fn(self.test_n)
        self._inception = None  # (feature fn, test_n features, train_n features)

    def score(self, images: np.ndarray) -> dict:
        """QUALITY, COVERAGE and PIXELS of images uint8 [N, 28, 28]."""
        return dict(quality(self.real_all, self.real_n, self.feat_fn(images)),
                    **metrics.class_coverage(self.prob_fn(images), self.test_labels,
                                             RECOGNISABLE),
                    **metrics.pixel_stats(images))

    def inception_fid(self, images: dict[str, np.ndarray]) -> dict | None:
        """{name: Inception FID against the N test images} and the floor's; None (with a
        line on stderr) without the Inception weights."""
        if self._inception is None:
            try:
                fn = inception_feature_fn()
            except FileNotFoundError as e:
                print(f"Inception FID skipped: {str(e).splitlines()[0]}", file=sys.stderr)
                return None
            self._inception = (fn, fn(self.test_n), fn(self.train_n))
        fn, real, floor = self._inception
        fids = {s: metrics.fid_from_features(real, fn(x)) for s, x in images.items()}
        fids[FLOOR] = metrics.fid_from_features(real, floor)
        return fids


def reconstruct(first_stage: tuple, images: np.ndarray, batch: int = 500):
    """(float reconstructions in [-1, 1], inputs on that scale, codebook indices or None) of
    uint8 images through first_stage, the (model, variables, config, meta) of
    checkpoints.load_vae: posterior mean, quantised for vq, EMA parameters."""
    vae, variables = first_stage[:2]
    recon_fn = jax.jit(lambda v, x: vae.apply(v, x, method=nets.VAE.reconstruct))
    x = data.to_float(images)
    recons, codes = [], []
    for i in range(0, len(x), batch):
        r, info = recon_fn(variables, x[i:i + batch])
        recons.append(np.clip(np.asarray(r), -1.0, 1.0))
        if "index" in info:
            codes.append(np.asarray(info["index"]).ravel())
    return np.concatenate(recons), x, (np.concatenate(codes) if codes else None)


def autoencoder_quality(first_stage: tuple, test_images: np.ndarray, feat_fn, real_all: np.ndarray,
                        batch: int = 500) -> tuple[dict, np.ndarray]:
    """Reconstructions of test_images (uint8 [N, 28, 28]) through first_stage: MSE and PSNR
    on the [-1, 1] scale (peak-to-peak 2), reconstruction FID against the test set, pixel
    statistics, and for vq the codebook's perplexity and share of codes used. Returns
    (metrics, uint8 reconstructions [N, 28, 28])."""
    _, _, cfg, meta = first_stage
    r, x, codes = reconstruct(first_stage, test_images, batch)
    mse = float(np.mean(np.mean(np.square(r - x), axis=(1, 2, 3))))
    recons = data.to_uint8(r)
    ae = cfg.get("autoencoder") or {"reg": "kl"}
    out = dict(reg=ae["reg"], latent_shape=meta["latent_shape"], steps=meta["step"],
               perceptual_weight=cfg["loss"].get("perceptual_weight", 0.0),
               adversarial_weight=cfg["loss"].get("adversarial_weight", 0.0), mse=mse,
               psnr=float(10 * np.log10(4.0 / mse)),
               rfid=metrics.fid_from_features(real_all, feat_fn(recons)),
               **metrics.pixel_stats(recons))
    if codes is not None:
        usage = nets.codebook_usage(jnp.asarray(codes), ae["codebook_size"])
        out.update({k: float(v) for k, v in usage.items()}, codebook_size=ae["codebook_size"])
    print("vae: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                             if isinstance(v, float)), file=sys.stderr)
    if out["perceptual_weight"]:
        print(f"vae: note: {PERCEPTUAL_NOTE}", file=sys.stderr)
    return out, recons
