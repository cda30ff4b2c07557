"""The smoke preset's samples at a fixed seed are byte-identical to those of the code before
the screen-sized redesign (f6310a0): a refactor that changes numbers fails here."""

import hashlib

import jax
import pytest

from ldm_jax import sample

# sha256 of uint8 [8, 28, 28] samples: smoke_workdir's models, DDIM-5 eta 0, key 0, as f6310a0 drew them.
BEFORE = {
    "ldm": "9fc40750795a4278876bfa0ec74e2e2874b3b3a24441d86053f6b57fb3b6d7ed",
    "pixel": "6036e200cbd70b5cd7bbddbe0c09f917a30a5cccd22fd9cb4b93c79929894799",
}


@pytest.mark.parametrize("stage", ["ldm", "pixel"])
def test_smoke_samples_are_unchanged_by_refactors(smoke_workdir, stage):
    gen = sample.load_generator(smoke_workdir, stage)
    x = sample.generate(gen, 8, jax.random.key(0), "ddim", 5, 0.0, progress=False)
    digest = hashlib.sha256(x.tobytes()).hexdigest()
    print(stage, digest)
    assert digest == BEFORE[stage], f"{stage} samples changed: {digest}"
