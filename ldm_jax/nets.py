"""Flax Linen networks: the KL- or VQ-regularised autoencoder, the U-Net denoiser and the
MNIST classifier.

All NHWC. The U-Net is one class for latents [B, 7, 7, c] and pixels [B, 28, 28, 1];
only its config differs.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Sinusoidal embedding of t [B] (int or float) -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


WEIGHT_SCALE = 100.0  # guidance weights 0-10 embed over the timesteps' range, as in LCM


def downsampled_sizes(size: int, levels: int) -> list[int]:
    """Spatial sizes after each stride-2 'SAME' convolution: 28 -> [28, 14, 7, 4, ...]."""
    sizes = [size]
    for _ in range(levels):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def upsample_to(x: Array, size: int) -> Array:
    """Nearest-neighbour resize of x [B, H, W, C] to [B, size, size, C] (7 -> 14, 4 -> 7):
    exactly jax.image.resize(..., 'nearest'), written as a repeat for integer factors and
    a gather of fixed indices otherwise, whose gradients XLA:CPU computes up to 6x faster."""
    side = x.shape[1]
    if size % side == 0:
        f = size // side
        return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
    index = np.floor((np.arange(size) + 0.5) * side / size).astype(np.int32)
    return jnp.take(jnp.take(x, index, axis=1), index, axis=2)


def group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float = 1e-6) -> Array:
    """GroupNorm (Wu & He 2018) of x [B, ..., C] over all but the batch axis, per group of
    C // groups channels, then a per-channel affine: the same function as
    flax.linen.GroupNorm (including its E[x^2] - E[x]^2 variance), written as one affine
    x * a + b with a, b [B, 1, .., C], which XLA:CPU differentiates about twice as fast.
    Statistics are float32 whatever x's dtype; the output has x's dtype."""
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xg), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + eps)  # [B, 1, .., groups, 1]
    per_channel = lambda g: jnp.broadcast_to(g, g.shape[:-1] + (c // groups,)).reshape(
        (b,) + (1,) * (x.ndim - 2) + (c,))
    a = per_channel(inv) * scale
    return (x * a + (bias - per_channel(mean) * a)).astype(x.dtype)


class GroupNorm(nn.Module):
    """flax.linen.GroupNorm's parameters ('scale', 'bias') and function, via `group_norm`."""
    num_groups: int = 8
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if self.num_groups <= 0 or c % self.num_groups:
            raise ValueError(f"{self.num_groups} groups do not divide {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, with an optional additive embedding (time, class)."""
    out_ch: int
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        h = nn.Conv(self.out_ch, (3, 3))(nn.swish(GroupNorm(self.groups)(x)))
        if emb is not None:
            h = h + nn.Dense(self.out_ch)(nn.swish(emb))[:, None, None, :]
        h = nn.swish(GroupNorm(self.groups)(h))
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
        y = GroupNorm(self.groups)(x).reshape(b, h * w, c)
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
    def __call__(self, x: Array, context: Array, context_mask: Array | None = None) -> Array:
        """x [B, H, W, C], context [B, L, D], context_mask bool [B, L] (False: padding,
        never attended to) -> [B, H, W, C]. The cross-attention weights are sown into
        'intermediates' (kept only when that collection is mutable)."""
        mask = None if context_mask is None else context_mask[:, None, None, :]
        b, h, w, c = x.shape
        y = nn.Dense(c, name="proj_in")(GroupNorm(self.groups)(x).reshape(b, h * w, c))
        y = y + nn.MultiHeadDotProductAttention(self.heads, name="self_attn")(nn.LayerNorm()(y))
        y = y + nn.MultiHeadDotProductAttention(self.heads, name="cross_attn")(
            nn.LayerNorm()(y), context, mask=mask, sow_weights=True)
        y = y + nn.Dense(c)(nn.gelu(nn.Dense(4 * c)(nn.LayerNorm()(y))))
        y = nn.Dense(c, kernel_init=nn.initializers.zeros, name="proj_out")(y)
        return x + y.reshape(b, h, w, c)


CONDITIONING = ("none", "class", "crossattn", "text")


def _check_conditioning(conditioning: str, y, weight_input: bool = False, w=None) -> None:
    if conditioning not in CONDITIONING:
        raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}")
    if (conditioning == "none") != (y is None):
        raise ValueError(f"conditioning={conditioning!r} needs labels y exactly when "
                         "it is not 'none'")
    if weight_input != (w is not None):
        raise ValueError(f"weight_input={weight_input} but w is "
                         f"{'given' if w is not None else 'missing'}")


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): residual U-Net with self-attention at the lowest resolution.

    Level i has ch * ch_mult[i] channels and num_res_blocks residual blocks; a stride-2
    convolution sits between levels, so len(ch_mult) = 2 gives 7 -> 4, 3 gives 28 -> 14 -> 7.

    conditioning: 'none'; 'class' (a label embedding added to the time embedding); or
    'crossattn' (SpatialTransformer blocks at every level below the first and in the
    middle, attending to `context_tokens` learned tokens per label). Label `num_classes`
    is the null label of classifier-free guidance. 'text': the same blocks attend to
    `text_encoder(y)` for prompt tokens y [B, L] (ldm_jax.text.TextEncoder: context and
    padding mask), trained with the U-Net; the empty prompt is the null condition.
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
    text_encoder: nn.Module | None = None  # 'text': tokens [B, L] -> (context, mask)
    weight_input: bool = False  # a few-step student that takes its guidance weight w [B]

    def _embedding(self, dtype, t: Array, w: Array | None, emb_dim: int) -> Array:
        """The time embedding [B, emb_dim] in the compute dtype, plus LCM's w-embedding for
        weight_input, whose zero output layer makes a fresh one ignore w."""
        emb = timestep_embedding(t, self.ch).astype(dtype)
        emb = nn.Dense(emb_dim)(nn.swish(nn.Dense(emb_dim)(emb)))
        if not self.weight_input:
            return emb
        w_emb = timestep_embedding(WEIGHT_SCALE * w, self.ch).astype(dtype)
        w_emb = nn.swish(nn.Dense(emb_dim, name="weight_emb")(w_emb))
        return emb + nn.Dense(emb_dim, kernel_init=nn.initializers.zeros,
                              name="weight_emb_out")(w_emb)

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None,
                 w: Array | None = None) -> Array:
        """x: [B, H, W, C]; t: [B] int timesteps; y: [B] int labels (num_classes = null),
        or for 'text' [B, L] prompt tokens; w: [B] guidance weights (weight_input only);
        returns eps [B, H, W, C]."""
        assert x.ndim == 4 and t.shape == (x.shape[0],), (x.shape, t.shape)
        _check_conditioning(self.conditioning, y, self.weight_input, w)
        emb_dim = 4 * self.ch
        emb = self._embedding(x.dtype, t, w, emb_dim)
        context = context_mask = None
        if self.conditioning == "class":
            emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="label_emb")(y)
        elif self.conditioning == "crossattn":
            context = nn.Embed(self.num_classes + 1, self.context_tokens * self.context_dim,
                               name="label_tokens")(y).reshape(-1, self.context_tokens,
                                                               self.context_dim)
        elif self.conditioning == "text":
            if self.text_encoder is None:
                raise ValueError("conditioning='text' needs a text_encoder")
            context, context_mask = self.text_encoder(y)

        def attend(h, level):  # self-attention, or a SpatialTransformer when cross-attending
            if context is not None:
                return SpatialTransformer(self.heads, self.groups)(h, context, context_mask)
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
        h = nn.swish(GroupNorm(self.groups)(h))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)


class Encoder(nn.Module):
    """x [B, 28, 28, 1] -> [B, s, s, out_ch], s = 28 / 2^len(channels)."""
    channels: Sequence[int] = (32, 64)
    out_ch: int = 8
    num_res_blocks: int = 1
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Conv(self.channels[0], (3, 3))(x)
        for ch in self.channels:
            for _ in range(self.num_res_blocks):
                h = ResBlock(ch, self.groups)(h)
            h = nn.Conv(ch, (3, 3), strides=(2, 2))(h)
        h = ResBlock(self.channels[-1], self.groups)(h)
        h = nn.swish(GroupNorm(self.groups)(h))
        return nn.Conv(self.out_ch, (1, 1))(h)


class Decoder(nn.Module):
    """z [B, s, s, latent_ch] -> x [B, 28, 28, 1]; mirrors the Encoder."""
    channels: Sequence[int] = (32, 64)
    num_res_blocks: int = 1
    groups: int = 8
    image_size: int = 28
    out_ch: int = 1  # see decoder_image

    @nn.compact
    def __call__(self, z: Array) -> Array:
        sizes = downsampled_sizes(self.image_size, len(self.channels))
        h = nn.Conv(self.channels[-1], (3, 3))(z)
        h = ResBlock(self.channels[-1], self.groups)(h)
        for level in reversed(range(len(self.channels))):
            h = nn.Conv(self.channels[level], (3, 3))(upsample_to(h, sizes[level]))
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels[level], self.groups)(h)
        h = nn.swish(GroupNorm(self.groups)(h))
        return nn.Conv(self.out_ch, (3, 3))(h)


# ----------------------------------------------------------------------------- Vector quantisation


def nearest_code(z: Array, codebook: Array) -> Array:
    """z [N, D], codebook [K, D] -> index [N] of the nearest code in Euclidean distance."""
    d2 = (jnp.sum(z * z, 1, keepdims=True) - 2.0 * z @ codebook.T
          + jnp.sum(codebook * codebook, 1)[None])
    return jnp.argmin(d2, axis=1)


def codebook_usage(index: Array, num_codes: int) -> dict:
    """Perplexity exp(H(p)) of the code histogram of index [N], and the share of codes used."""
    p = jnp.bincount(index, length=num_codes) / index.shape[0]
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return dict(perplexity=jnp.exp(entropy), codes_used=jnp.mean(p > 0))


def ema_codebook_update(vq: dict, z: Array, index: Array, key: Array, decay: float,
                        dead_threshold: float, eps: float = 1e-5) -> tuple[dict, Array]:
    """One EMA step of the codebook (van den Oord et al. 2017, App. A.1), then dead-code restarts.

    vq: {'codebook' [K, D], 'cluster_size' [K], 'embed_sum' [K, D]}; z [N, D] encoder
    outputs, index [N] their nearest codes. Cluster sizes and sums move toward this batch's
    counts and sums; each code is their (Laplace-smoothed) ratio. A code whose EMA count
    falls below dead_threshold vectors per batch is restarted on a random z of this batch.
    Returns (new vq, number of codes restarted).
    """
    num_codes = vq["codebook"].shape[0]
    onehot = jax.nn.one_hot(index, num_codes, dtype=z.dtype)  # [N, K]
    size = decay * vq["cluster_size"] + (1.0 - decay) * jnp.sum(onehot, 0)
    embed_sum = decay * vq["embed_sum"] + (1.0 - decay) * onehot.T @ z
    total = jnp.sum(size)
    smoothed = (size + eps) / (total + num_codes * eps) * total
    codebook = embed_sum / smoothed[:, None]
    dead = size < dead_threshold  # [K]
    pick = z[jax.random.randint(key, (num_codes,), 0, z.shape[0])]  # [K, D]
    return dict(codebook=jnp.where(dead[:, None], pick, codebook),
                cluster_size=jnp.where(dead, 1.0, size),
                embed_sum=jnp.where(dead[:, None], pick, embed_sum)), jnp.sum(dead)


class VectorQuantizer(nn.Module):
    """Codebook of num_codes vectors, kept in the 'vq' collection and learned by EMA.

    z [B, H, W, D] -> (straight-through quantised z [B, H, W, D], info): the forward value
    is the nearest code, the gradient passes to z unchanged (van den Oord et al. 2017).
    When 'vq' is mutable (training) the codebook takes one ema_codebook_update step,
    using the 'vq' RNG stream for dead-code restarts.
    """
    num_codes: int = 256
    decay: float = 0.99
    dead_threshold: float = 1.0

    @nn.compact
    def __call__(self, z: Array) -> tuple[Array, dict]:
        dim = z.shape[-1]
        init = lambda: jax.random.uniform(self.make_rng("params"), (self.num_codes, dim),
                                          minval=-1.0 / self.num_codes, maxval=1.0 / self.num_codes)
        codebook = self.variable("vq", "codebook", init)
        size = self.variable("vq", "cluster_size", lambda: jnp.ones((self.num_codes,)))
        embed_sum = self.variable("vq", "embed_sum", lambda: codebook.value)
        flat = z.reshape(-1, dim)
        index = nearest_code(flat, codebook.value)
        q = codebook.value[index].reshape(z.shape)
        info = dict(commit=jnp.mean(jnp.sum(jnp.square(z - jax.lax.stop_gradient(q)), -1)),
                    index=index.reshape(z.shape[:-1]), restarted=jnp.zeros((), jnp.int32),
                    **codebook_usage(index, self.num_codes))
        if self.is_mutable_collection("vq") and not self.is_initializing():
            new, info["restarted"] = ema_codebook_update(
                dict(codebook=codebook.value, cluster_size=size.value, embed_sum=embed_sum.value),
                jax.lax.stop_gradient(flat), index, self.make_rng("vq"), self.decay,
                self.dead_threshold)
            codebook.value, size.value, embed_sum.value = (
                new["codebook"], new["cluster_size"], new["embed_sum"])
        return z + jax.lax.stop_gradient(q - z), info


REGULARISERS = ("kl", "vq")
LIKELIHOODS = ("gaussian", "bernoulli", "hurdle", "hurdle_logit")
OUTPUT_CHANNELS = {"gaussian": 1, "bernoulli": 1, "hurdle": 2, "hurdle_logit": 3}


def decoder_image(out: Array, likelihood: str, mean: bool = False) -> Array:
    """The decoder's output [B, 28, 28, C] -> image [B, 28, 28, 1] in [-1, 1].
    gaussian: itself (a mean trained by squared error). bernoulli: 2 sigmoid(out) - 1 (logits
    of the intensity). hurdle: channel 0 is the logit of 'the pixel is not 0', channel 1 the
    logit of a nonzero pixel's intensity; the image is 0 where 0 is the likelier outcome and
    that intensity elsewhere, or with mean=True (differentiable, for the training losses) the
    expected intensity P(not 0) * intensity. hurdle_logit: as hurdle, channel 1 the median of
    a logit-normal intensity (channel 2 its log scale)."""
    if likelihood == "gaussian":
        return out
    if likelihood == "bernoulli":
        return 2.0 * jax.nn.sigmoid(out) - 1.0
    ink, intensity = out[..., :1], out[..., 1:2]
    if mean:
        return 2.0 * jax.nn.sigmoid(ink) * jax.nn.sigmoid(intensity) - 1.0
    return jnp.where(ink > 0, 2.0 * jax.nn.sigmoid(intensity) - 1.0, -1.0)


class VAE(nn.Module):
    """The first stage: a KL-regularised VAE (Kingma & Welling 2014) or a VQ-regularised
    autoencoder (van den Oord et al. 2017), as in Rombach et al. 2022, Sec. 3.

    reg='kl': encode -> (mean, logvar) of a diagonal Gaussian posterior.
    reg='vq': encode -> (z_e, logvar = -inf), the pre-quantisation latent with a point-mass
    posterior; quantisation happens inside `decode`, so the LDM diffuses z_e.
    """
    channels: Sequence[int] = (32, 64)
    latent_ch: int = 4
    num_res_blocks: int = 1
    groups: int = 8
    decoder_res_blocks: int = -1  # the decoder's blocks per level; < 0: num_res_blocks
    reg: str = "kl"
    num_codes: int = 256  # vq only
    codebook_decay: float = 0.99  # vq only
    dead_threshold: float = 1.0  # vq only
    likelihood: str = "gaussian"  # what the decoder outputs: see decoder_image

    def setup(self):
        if self.reg not in REGULARISERS:
            raise ValueError(f"reg must be one of {REGULARISERS}, got {self.reg!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        out_ch = 2 * self.latent_ch if self.reg == "kl" else self.latent_ch
        self.encoder = Encoder(self.channels, out_ch, self.num_res_blocks, self.groups)
        dec_blocks = self.num_res_blocks if self.decoder_res_blocks < 0 else self.decoder_res_blocks
        self.decoder = Decoder(self.channels, dec_blocks, self.groups,
                               out_ch=OUTPUT_CHANNELS[self.likelihood])
        if self.reg == "vq":
            self.quantizer = VectorQuantizer(self.num_codes, self.codebook_decay,
                                             self.dead_threshold)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """x [B, 28, 28, 1] -> (mean, logvar), each [B, s, s, latent_ch]."""
        h = self.encoder(x)
        if self.reg == "vq":
            return h, jnp.full_like(h, -jnp.inf)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def quantize(self, z: Array) -> tuple[Array, dict]:
        """z [B, s, s, c] -> (z for the decoder, info); the identity for reg='kl'."""
        return self.quantizer(z) if self.reg == "vq" else (z, {})

    def decode(self, z: Array) -> Array:
        """z [B, s, s, latent_ch] (pre-quantisation for vq) -> x [B, 28, 28, 1]."""
        return decoder_image(self.decoder(self.quantize(z)[0]), self.likelihood)

    def reconstruct(self, x: Array) -> tuple[Array, dict]:
        """x [B, 28, 28, 1] -> (decode(posterior mean) [B, 28, 28, 1], quantiser info)."""
        zq, info = self.quantize(self.encode(x)[0])
        return decoder_image(self.decoder(zq), self.likelihood), info

    def __call__(self, x: Array, key: Array) -> tuple[Array, dict]:
        """x [B, 28, 28, 1] -> (decoder output [B, 28, 28, C]: the image for 'gaussian', its
        logits for the others; decoder_image maps it to [-1, 1], info): mean and logvar
        [B, s, s, c] for kl; commit, perplexity, codes_used, index for vq."""
        mean, logvar = self.encode(x)
        if self.reg == "kl":
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            return self.decoder(z), dict(mean=mean, logvar=logvar)
        zq, info = self.quantizer(mean)
        return self.decoder(zq), info


class PatchDiscriminator(nn.Module):
    """The first stage's adversary: a PatchGAN (Isola et al. 2017) as in Esser et al. 2021
    and Rombach et al. 2022, scaled to 28x28. x [B, 28, 28, 1] -> logits [B, 7, 7, 1], one
    real/fake logit per overlapping 18x18 patch: two stride-2 4x4 convolutions (GroupNorm
    after the second, LeakyReLU 0.2 after each), then a 3x3 convolution to one channel."""
    channels: Sequence[int] = (32, 64)
    groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x
        for i, ch in enumerate(self.channels):
            h = nn.Conv(ch, (4, 4), strides=(2, 2))(h)
            if i > 0:
                h = nn.GroupNorm(self.groups)(h)
            h = nn.leaky_relu(h, 0.2)
        return nn.Conv(1, (3, 3))(h)


def last_decoder_layer(vae_params: dict) -> tuple[str, str, str]:
    """Path of the kernel of the Decoder's output convolution in a VAE's params, the
    'last layer' of the adversarial loss's adaptive weight: the highest-numbered Conv."""
    convs = [k for k in vae_params["decoder"] if k.startswith("Conv_")]
    name = max(convs, key=lambda k: int(k.split("_")[1]))
    kernel = vae_params["decoder"][name]["kernel"]
    assert kernel.shape[-1] <= max(OUTPUT_CHANNELS.values()), f"decoder/{name} is not the output layer: {kernel.shape}"
    return "decoder", name, "kernel"


class ClassifierTrunk(nn.Module):
    """Two conv-conv-pool stages and a dense layer: x [B, 28, 28, 1] -> [B, feature_dim]
    (with_activations: also the four conv activations, for the perceptual loss)."""
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x: Array, with_activations: bool = False):
        acts = []
        for ch in (32, 64):
            x = nn.relu(nn.Conv(ch, (3, 3))(x))
            acts.append(x)
            x = nn.relu(nn.Conv(ch, (3, 3))(x))
            acts.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        feats = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return (feats, acts) if with_activations else feats


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

    def activations(self, x: Array) -> list[Array]:
        """x [B, 28, 28, 1] -> the four conv activations [B, H, W, C] (28, 28, 14, 14)."""
        return self.trunk(x, with_activations=True)[1]

    def __call__(self, x: Array) -> Array:
        """x [B, 28, 28, 1] -> logits [B, num_classes]."""
        return self.head(self.trunk(x))
