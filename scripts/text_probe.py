"""Does a text LDM's prompt encoder tell the digits apart on prompts it never saw? The
encoder probe of docs/results.md, "Conditioning and text" (92 % without the character
convolution, 100 % with it).

    python scripts/text_probe.py --workdir=runs/text

A probe of the encoder alone, no sampling: mean-pool its outputs over each prompt's tokens,
fit one mean per digit on the training (template, spelling) pairs, and classify the held-out
pairs by the nearest mean. Prints the accuracy over all, and per held-out pair.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ldm_jax import cli, sample, text

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a text-conditioned LDM.")
flags.mark_flag_as_required("workdir")


def pooled(encoder, params, pairs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean-pooled encoder outputs of every digit in every pair, their digits, pair names."""
    prompts = [(text.make_prompt(d, t, s), d, f"{t} | {s}") for d in range(10) for t, s in pairs]
    tokens = jnp.asarray(text.encode_batch([p for p, _, _ in prompts]))
    h, mask = encoder.apply({"params": params}, tokens)
    m = np.asarray(mask, np.float32)[..., None]
    return (np.asarray(h) * m).sum(1) / m.sum(1), np.array([d for _, d, _ in prompts]), \
        [k for _, _, k in prompts]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_jax()
    gen = sample.load_generator(FLAGS.workdir, "ldm")
    if not sample.is_text(gen):
        raise SystemExit(f"{FLAGS.workdir}/ldm is not text-conditioned")
    enc, params = gen.unet.text_encoder, gen.params["text_encoder"]
    train_x, train_y, _ = pooled(enc, params, text.TRAIN_PAIRS)
    test_x, test_y, names = pooled(enc, params, text.HELD_OUT_PAIRS)
    means = np.stack([train_x[train_y == d].mean(0) for d in range(10)])
    nearest = lambda x: ((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    ok = nearest(test_x) == test_y
    print(f"train pairs {np.mean(nearest(train_x) == train_y):.3f}  held-out pairs {ok.mean():.3f}")
    for name in sorted(set(names)):
        print(f"  {name:40s} {ok[np.array(names) == name].mean():.2f}")


if __name__ == "__main__":
    app.run(main)
