"""score.SplitScorer: the val/test protocol of the scripts that choose defaults."""

import numpy as np
import pytest

from ldm_jax import data, features, inception, metrics, score


def stand_in(calls: list):
    """Cheap features in place of Inception's: any other image subset or order changes them."""
    def feats(images):
        calls.append(len(images))
        return np.asarray(images, np.float32).reshape(len(images), -1)[:, 300:308]
    return feats


def test_split_scorer_scores_against_the_holdout_and_the_test_set(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(inception, "load_params", lambda: {})
    monkeypatch.setattr(inception, "make_feature_fn", lambda params, batch_size: stand_in(calls))
    monkeypatch.setattr(features, "feature_fn", lambda path: stand_in([]))  # the classifier's
    monkeypatch.setattr(features, "probabilities_fn",
                        lambda path: lambda x: np.eye(10)[np.arange(len(x)) % 10])
    holdout, max_ref = 300, 200
    scorer = score.SplitScorer(score.SPLITS, holdout, max_ref)
    assert calls == [max_ref, max_ref]  # each split's reference features, once
    train, test = data.load("package", "train")[0], data.load("package", "test")[0]
    images = score.floor_images(50, holdout)
    assert not {x.tobytes() for x in images} & {x.tobytes() for x in train[-holdout:]}
    row = scorer(images)
    feats = stand_in([])
    for split, ref in (("val", train[-holdout:][:max_ref]), ("test", test[:max_ref])):
        assert row[f"fid_{split}"] == pytest.approx(
            metrics.fid_from_features(feats(ref), feats(images)), rel=1e-5)
        pick = np.random.default_rng(0).permutation(max_ref)[:50]
        p, r = metrics.precision_recall(feats(ref)[pick], feats(images), k=3)
        assert (row[f"precision_{split}"], row[f"recall_{split}"]) == pytest.approx((p, r))
    assert row["fid_val"] != row["fid_test"]
    assert row["classifier_fid_val"] == pytest.approx(row["fid_val"], rel=1e-5)
    assert row["recognisable"] == 1.0 and set(score.PIXELS) <= set(row)
    calls.clear()
    score.SplitScorer(score.SPLITS, holdout, max_ref)  # the references come from the cache
    assert calls == []
    (tmp_path / "other.npz").write_bytes(b"other weights")
    monkeypatch.setattr(inception, "default_weights_path", lambda: str(tmp_path / "other.npz"))
    score.SplitScorer(score.SPLITS, holdout, max_ref)  # other Inception weights: computed again
    assert calls == [max_ref, max_ref]


def test_split_images_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="split must be val|test"):
        score.split_images("train", 2000)
