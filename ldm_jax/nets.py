"""Flax Linen networks: the KL-regularised VAE, the U-Net denoiser and the MNIST classifier.

All NHWC. The U-Net is one class for latents [B, 7, 7, c] and pixels [B, 28, 28, 1];
only its config differs.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Sinusoidal embedding of t [B] (int or float) -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def downsampled_sizes(size: int, levels: int) -> list[int]:
    """Spatial sizes after each stride-2 'SAME' convolution: 28 -> [28, 14, 7, 4, ...]."""
    sizes = [size]
    for _ in range(levels):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def upsample_to(x: Array, size: int) -> Array:
    """Nearest-neighbour resize of x [B, H, W, C] to [B, size, size, C] (7 -> 14, 4 -> 7)."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "nearest")


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, with an optional additive embedding (time, class)."""
    out_ch: int
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        h = nn.Conv(self.out_ch, (3, 3))(nn.swish(nn.GroupNorm(self.groups)(x)))
        if emb is not None:
            h = h + nn.Dense(self.out_ch)(nn.swish(emb))[:, None, None, :]
        h = nn.swish(nn.GroupNorm(self.groups)(h))
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1))(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, residual."""
    heads: int = 4
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups)(x).reshape(b, h * w, c)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, out_kernel_init=nn.initializers.zeros)(y, y)
        return x + y.reshape(b, h, w, c)


class SpatialTransformer(nn.Module):
    """Rombach et al.'s conditioning block: self-attention, cross-attention to context
    tokens, feed-forward, each pre-LayerNorm and residual, between 1x1 projections.

    proj_out starts at zero, so a fresh block is the identity.
    """
    heads: int = 4
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x [B, H, W, C], context [B, L, D] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        y = nn.Dense(c, name="proj_in")(nn.GroupNorm(self.groups)(x).reshape(b, h * w, c))
        y = y + nn.MultiHeadDotProductAttention(self.heads, name="self_attn")(nn.LayerNorm()(y))
        y = y + nn.MultiHeadDotProductAttention(self.heads, name="cross_attn")(
            nn.LayerNorm()(y), context)
        y = y + nn.Dense(c)(nn.gelu(nn.Dense(4 * c)(nn.LayerNorm()(y))))
        y = nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(y)
        return x + y.reshape(b, h, w, c)


CONDITIONING = ("none", "class", "crossattn")


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): residual U-Net with self-attention at the lowest resolution.

    Level i has ch * ch_mult[i] channels and num_res_blocks residual blocks; a stride-2
    convolution sits between levels, so len(ch_mult) = 2 gives 7 -> 4, 3 gives 28 -> 14 -> 7.

    conditioning: 'none'; 'class' (a label embedding added to the time embedding); or
    'crossattn' (SpatialTransformer blocks at every level below the first and in the
    middle, attending to `context_tokens` learned tokens per label). Label `num_classes`
    is the null label of classifier-free guidance.
    """
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 2
    heads: int = 4
    groups: int = 8
    conditioning: str = "none"
    num_classes: int = 10
    context_tokens: int = 4
    context_dim: int = 64

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        """x: [B, H, W, C]; t: [B] int timesteps; y: [B] int labels (num_classes = null);
        returns eps [B, H, W, C]."""
        assert x.ndim == 4 and t.shape == (x.shape[0],), (x.shape, t.shape)
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {self.conditioning!r}")
        if (self.conditioning == "none") != (y is None):
            raise ValueError(f"conditioning={self.conditioning!r} needs labels y exactly when "
                             "it is not 'none'")
        emb_dim = 4 * self.ch
        emb = timestep_embedding(t, self.ch)
        emb = nn.Dense(emb_dim)(nn.swish(nn.Dense(emb_dim)(emb)))
        context = None
        if self.conditioning == "class":
            emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="label_emb")(y)
        elif self.conditioning == "crossattn":
            context = nn.Embed(self.num_classes + 1, self.context_tokens * self.context_dim,
                               name="label_tokens")(y).reshape(-1, self.context_tokens,
                                                               self.context_dim)

        def attend(h, level):  # self-attention, or a SpatialTransformer when cross-attending
            if context is not None:
                return SpatialTransformer(self.heads, self.groups)(h, context)
            if level == len(self.ch_mult) - 1:
                return AttnBlock(self.heads, self.groups)(h)
            return h
        sizes = downsampled_sizes(x.shape[1], len(self.ch_mult) - 1)

        # Down path: keep every activation for the skip connections.
        h = nn.Conv(self.ch, (3, 3))(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, self.groups)(h, emb)
                if context is not None and level > 0:
                    h = attend(h, level)
                skips.append(h)
            if level < len(self.ch_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)

        # Middle, at the lowest resolution.
        h = ResBlock(h.shape[-1], self.groups)(h, emb)
        h = attend(h, len(self.ch_mult) - 1)
        h = ResBlock(h.shape[-1], self.groups)(h, emb)

        # Up path: concatenate skips, attention again at the lowest level.
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.ch * self.ch_mult[level], self.groups)(
                    jnp.concatenate([h, skips.pop()], axis=-1), emb)
                if level == len(self.ch_mult) - 1 or (context is not None and level > 0):
                    h = attend(h, level)
            if level > 0:
                h = nn.Conv(h.shape[-1], (3, 3))(upsample_to(h, sizes[level - 1]))
        assert not skips
        h = nn.swish(nn.GroupNorm(self.groups)(h))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)


class Encoder(nn.Module):
    """x [B, 28, 28, 1] -> (mean, logvar), each [B, s, s, latent_ch], s = 28 / 2^len(channels)."""
    channels: Sequence[int] = (32, 64)
    latent_ch: int = 4
    num_res_blocks: int = 1
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = nn.Conv(self.channels[0], (3, 3))(x)
        for ch in self.channels:
            for _ in range(self.num_res_blocks):
                h = ResBlock(ch, self.groups)(h)
            h = nn.Conv(ch, (3, 3), strides=(2, 2))(h)
        h = ResBlock(self.channels[-1], self.groups)(h)
        h = nn.swish(nn.GroupNorm(self.groups)(h))
        moments = nn.Conv(2 * self.latent_ch, (1, 1))(h)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    """z [B, s, s, latent_ch] -> x [B, 28, 28, 1]; mirrors the Encoder."""
    channels: Sequence[int] = (32, 64)
    num_res_blocks: int = 1
    groups: int = 8
    image_size: int = 28

    @nn.compact
    def __call__(self, z: Array) -> Array:
        sizes = downsampled_sizes(self.image_size, len(self.channels))
        h = nn.Conv(self.channels[-1], (3, 3))(z)
        h = ResBlock(self.channels[-1], self.groups)(h)
        for level in reversed(range(len(self.channels))):
            h = nn.Conv(self.channels[level], (3, 3))(upsample_to(h, sizes[level]))
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels[level], self.groups)(h)
        h = nn.swish(nn.GroupNorm(self.groups)(h))
        return nn.Conv(1, (3, 3))(h)


class VAE(nn.Module):
    """KL-regularised autoencoder (Kingma & Welling 2014; Rombach et al. 2022, Sec. 3)."""
    channels: Sequence[int] = (32, 64)
    latent_ch: int = 4
    num_res_blocks: int = 1
    groups: int = 8

    def setup(self):
        self.encoder = Encoder(self.channels, self.latent_ch, self.num_res_blocks, self.groups)
        self.decoder = Decoder(self.channels, self.num_res_blocks, self.groups)

    def encode(self, x: Array) -> tuple[Array, Array]:
        return self.encoder(x)

    def decode(self, z: Array) -> Array:
        return self.decoder(z)

    def __call__(self, x: Array, key: Array) -> tuple[Array, Array, Array]:
        """x [B, 28, 28, 1] -> (reconstruction [B, 28, 28, 1], mean, logvar [B, s, s, c])."""
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


class ClassifierTrunk(nn.Module):
    """Two conv-conv-pool stages and a dense layer: x [B, 28, 28, 1] -> [B, feature_dim]."""
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for ch in (32, 64):
            x = nn.relu(nn.Conv(ch, (3, 3))(x))
            x = nn.relu(nn.Conv(ch, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))


class Classifier(nn.Module):
    """Small MNIST CNN; `features` (the penultimate layer) are the MNIST-FID features."""
    num_classes: int = 10
    feature_dim: int = 128

    def setup(self):
        self.trunk = ClassifierTrunk(self.feature_dim)
        self.head = nn.Dense(self.num_classes)

    def features(self, x: Array) -> Array:
        """x [B, 28, 28, 1] in [-1, 1] -> [B, feature_dim]."""
        return self.trunk(x)

    def __call__(self, x: Array) -> Array:
        """x [B, 28, 28, 1] -> logits [B, num_classes]."""
        return self.head(self.trunk(x))
