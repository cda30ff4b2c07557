"""Text prompts for the LDM: prompts made from MNIST labels, a character tokenizer whose
vocabulary is committed here, and the small transformer that encodes a prompt into the
context tokens the U-Net's spatial transformers cross-attend to (Rombach et al. 2022,
Sec. 4.3.2: a transformer trained jointly with the LDM).

A prompt names a digit through a template ("a handwritten {}") filled with a spelling of
the digit, its word ("seven") or its numeral ("7"). Training draws (template, spelling)
pairs from TRAIN_PAIRS; HELD_OUT_PAIRS are never seen in training (whole templates, and a
few spellings of seen templates) and measure how far the encoder generalises.

Prompts are lowercased and their whitespace collapsed (`normalize`) before tokenizing.
Token 0 is padding and token 1 starts every prompt, so the empty prompt, the unconditional
model of classifier-free guidance, is one token long. Nothing here downloads anything.
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPELLINGS = ("word", "numeral")

# Templates seen in training (with both spellings, except HELD_OUT_SPELLINGS).
TEMPLATES = (
    "{}", "the digit {}", "a handwritten {}", "number {}, written by hand", "digit {}",
    "the number {}", "a {}", "an image of the digit {}", "a photo of a handwritten {}",
    "{} written by hand", "a drawing of the number {}", "handwritten digit {}",
    "a picture of the number {}", "a quick sketch of a {}", "a scribbled {}",
)
# Templates never seen in training.
HELD_OUT_TEMPLATES = (
    "the handwritten number {}", "a drawing of a {}", "picture of digit {}",
    "{}, drawn by hand", "an image of a handwritten {}", "a black and white {}",
)
# Seen templates whose other spelling is never seen in training.
HELD_OUT_SPELLINGS = (("the number {}", "word"), ("handwritten digit {}", "numeral"),
                      ("an image of the digit {}", "numeral"))

TRAIN_PAIRS = tuple((t, s) for t in TEMPLATES for s in SPELLINGS
                    if (t, s) not in HELD_OUT_SPELLINGS)
HELD_OUT_PAIRS = tuple((t, s) for t in HELD_OUT_TEMPLATES for s in SPELLINGS) + HELD_OUT_SPELLINGS

# The characters of every prompt the templates make (tests/test_text.py rebuilds it from
# the templates and checks it is this string; every one of them occurs in training).
VOCAB = " ,0123456789abcdefghiklmnopqrstuvwxyz"
PAD, BOS = 0, 1  # token ids; characters are 2 + their index in VOCAB
VOCAB_SIZE = 2 + len(VOCAB)
MAX_CHARS = 40  # the longest prompt, in characters after `normalize`
SEQ_LEN = MAX_CHARS + 1  # tokens per prompt: BOS, the characters, padding
_ID = {ch: 2 + i for i, ch in enumerate(VOCAB)}


class PromptError(ValueError):
    """A prompt the tokenizer cannot take; the message is one line for the user."""


def spell(digit: int, spelling: str) -> str:
    """7, 'word' -> 'seven'; 7, 'numeral' -> '7'."""
    return WORDS[digit] if spelling == "word" else str(digit)


def make_prompt(digit: int, template: str, spelling: str) -> str:
    """A template filled with a spelling of digit ('a {}' takes 'an' before eight and 8)."""
    return re.sub(r"\ba (?=(eight|8)\b)", "an ", template.format(spell(digit, spelling)))


def normalize(prompt: str) -> str:
    """Lowercase, surrounding whitespace dropped, inner runs of whitespace one space."""
    return " ".join(prompt.lower().split())


def check_prompt(prompt: str, max_chars: int = MAX_CHARS) -> str:
    """The normalized prompt, or PromptError naming what the tokenizer cannot take."""
    bad = sorted({ch for ch in prompt if not ch.isspace() and ch.lower() not in _ID})
    if bad:
        raise PromptError(f"prompt {prompt!r} has characters outside the vocabulary: "
                          f"{', '.join(repr(ch) for ch in bad)} (it knows {VOCAB!r}, "
                          "case-insensitive)")
    text = normalize(prompt)
    if any(ch not in _ID for ch in text):  # a character whose lowercase is two characters
        raise PromptError(f"prompt {prompt!r} has characters outside the vocabulary")
    if len(text) > max_chars:
        raise PromptError(f"prompt {prompt!r} is {len(text)} characters long; the text "
                          f"encoder takes at most {max_chars}")
    return text


def encode(prompt: str, length: int = SEQ_LEN) -> np.ndarray:
    """prompt -> tokens int32 [length]: BOS, one token per character, PAD after."""
    text = check_prompt(prompt, length - 1)
    tokens = np.zeros((length,), np.int32)
    tokens[0] = BOS
    tokens[1:1 + len(text)] = [_ID[ch] for ch in text]
    return tokens


def encode_batch(prompts: Sequence[str], length: int = SEQ_LEN) -> np.ndarray:
    """prompts -> tokens int32 [len(prompts), length]."""
    return np.stack([encode(p, length) for p in prompts]) if prompts else \
        np.zeros((0, length), np.int32)


def decode(tokens) -> str:
    """tokens [L] -> the normalized prompt (BOS and PAD dropped)."""
    return "".join(VOCAB[int(t) - 2] for t in np.asarray(tokens) if int(t) >= 2)


def padding_mask(tokens: Array) -> Array:
    """tokens [B, L] -> bool [B, L], True where a token is not padding."""
    return tokens != PAD


# ----------------------------------------------------------------------------- Training prompts


def prompt_table(pairs: Sequence[tuple[str, str]] = TRAIN_PAIRS,
                 length: int = SEQ_LEN) -> np.ndarray:
    """Tokens of every (template, spelling) pair for every digit: int32 [10, len(pairs), L]."""
    return np.stack([encode_batch([make_prompt(d, t, s) for t, s in pairs], length)
                     for d in range(10)])


def sample_prompts(key: Array, labels: Array, table: Array, p_empty: float) -> Array:
    """Tokens [B, L] of a random prompt naming each label [B], drawn uniformly from table
    [10, K, L]; with probability p_empty the empty prompt instead (classifier-free
    guidance training, Ho & Salimans 2021)."""
    pick_key, drop_key = jax.random.split(key)
    pick = jax.random.randint(pick_key, labels.shape, 0, table.shape[1])
    tokens = table[labels, pick]
    empty = jnp.zeros_like(tokens).at[:, 0].set(BOS)
    drop = jax.random.uniform(drop_key, labels.shape) < p_empty
    return jnp.where(drop[:, None], empty, tokens)


# ----------------------------------------------------------------------------- Encoder


class TextEncoder(nn.Module):
    """tokens [B, L] -> (context [B, L, width], padding mask [B, L]).

    Token embeddings, with `conv` > 0 plus a width-`conv` convolution over them (character
    n-grams: a word gives the same features wherever a template puts it, which learned
    positions alone must learn template by template), and learned position embeddings;
    then `layers` pre-LayerNorm transformer blocks (bidirectional self-attention over the
    non-padding tokens, GELU MLP), then LayerNorm. Padding never reaches a real token (the
    convolution sees padding as zeros, as it sees the sequence's ends), so the output at
    real tokens does not depend on how much padding follows them.
    """
    width: int = 64
    layers: int = 2
    heads: int = 4
    conv: int = 0
    vocab_size: int = VOCAB_SIZE
    max_len: int = SEQ_LEN

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        assert tokens.ndim == 2 and tokens.shape[1] <= self.max_len, tokens.shape
        mask = padding_mask(tokens)
        pos = self.param("pos_emb", nn.initializers.normal(0.02), (self.max_len, self.width))
        h = nn.Embed(self.vocab_size, self.width, name="token_emb")(tokens)
        if self.conv:
            h = h + nn.Conv(self.width, (self.conv,), padding="SAME", name="char_conv")(
                h * mask[..., None])
        h = h + pos[None, :tokens.shape[1]]
        for i in range(self.layers):
            h = h + nn.MultiHeadDotProductAttention(self.heads, name=f"attn_{i}")(
                nn.LayerNorm()(h), mask=mask[:, None, None, :])
            h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
        return nn.LayerNorm(name="ln_out")(h), mask
