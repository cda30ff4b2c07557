"""Model builders: a stored or live config (ConfigDict or the plain dict a checkpoint
holds) -> the Flax module or diffusion schedule it describes. Fields added after a
checkpoint was written fall back to their defaults here, in one place."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax import diffusion, nets, text


def build_vae(cfg) -> nets.VAE:
    """The first stage from a VAE config (ConfigDict or a checkpoint's config dict)."""
    m = cfg["model"]
    ae = cfg.get("autoencoder") or {}  # checkpoints from before VQ existed lack it
    return nets.VAE(channels=tuple(m["channels"]), latent_ch=m["latent_ch"],
                    num_res_blocks=m["num_res_blocks"], groups=m["groups"],
                    decoder_res_blocks=m.get("decoder_res_blocks", -1),
                    reg=ae.get("reg", "kl"), num_codes=ae.get("codebook_size", 256),
                    codebook_decay=ae.get("codebook_decay", 0.99),
                    dead_threshold=ae.get("dead_code_threshold", 1.0),
                    likelihood=ae.get("likelihood", "gaussian"))


# The key of the discriminator's parameters inside a VAE stage's params tree (present only
# when loss.adversarial_weight > 0); everything that encodes or decodes drops it.
DISCRIMINATOR = "discriminator"


def build_discriminator(cfg) -> nets.PatchDiscriminator | None:
    """The adversarial loss's discriminator of a VAE config, or None when the loss is off
    (loss.adversarial_weight = 0, and every config from before the option existed)."""
    if not (cfg["loss"].get("adversarial_weight") or 0.0) > 0:
        return None
    channels = cfg["loss"].get("disc_channels")  # absent before the option: the class default
    return nets.PatchDiscriminator(tuple(channels)) if channels else nets.PatchDiscriminator()


def split_discriminator(params: dict) -> tuple[dict, dict | None]:
    """A VAE stage's params -> (the autoencoder's own params, the discriminator's or None)."""
    if DISCRIMINATOR not in params:
        return params, None
    return {k: v for k, v in params.items() if k != DISCRIMINATOR}, params[DISCRIMINATOR]


def build_unet(model_cfg, weight_input: bool = False) -> nets.UNet:
    """The denoiser from a diffusion config's model section (weight_input: a student's, which
    also takes its guidance weight)."""
    get = model_cfg.get  # checkpoints from before conditioning existed lack its fields
    encoder = None
    if get("conditioning", "none") == "text":
        encoder = text.TextEncoder(width=get("context_dim", 64), layers=get("text_layers", 2),
                                   heads=model_cfg["heads"], conv=get("text_conv", 0))
    return nets.UNet(ch=model_cfg["ch"], ch_mult=tuple(model_cfg["ch_mult"]),
                     num_res_blocks=model_cfg["num_res_blocks"], heads=model_cfg["heads"],
                     groups=model_cfg["groups"], conditioning=get("conditioning", "none"),
                     num_classes=get("num_classes", 10), context_tokens=get("context_tokens", 4),
                     context_dim=get("context_dim", 64), text_encoder=encoder,
                     weight_input=weight_input)


def unet_fn(unet: nets.UNet, model_cfg, params):
    """(x, t[, y]) -> the U-Net's float32 output, computed in model_cfg's dtype: for
    bfloat16 the float32 parameters and input are cast on the way in (their gradients
    arrive in float32), as in mixed-precision training (Micikevicius et al. 2018)."""
    dtype = jnp.dtype(model_cfg.get("dtype", "float32"))
    if dtype == jnp.float32:
        return lambda x, t, *y: unet.apply({"params": params}, x, t, *y)
    cast = jax.tree.map(lambda p: p.astype(dtype), params)
    return lambda x, t, *y: unet.apply({"params": cast}, x.astype(dtype), t,
                                       *y).astype(jnp.float32)


def build_schedule(diff_cfg) -> diffusion.Schedule:
    """Schedule constants from a diffusion config's diffusion section."""
    return diffusion.make_schedule(diff_cfg["schedule"], diff_cfg["timesteps"],
                                   diff_cfg["beta_start"], diff_cfg["beta_end"],
                                   zero_terminal_snr=diff_cfg.get("zero_terminal_snr", False))


def prediction(diff_cfg) -> str:
    """What the U-Net predicts (checkpoints from before the option existed: eps)."""
    return diff_cfg.get("prediction", "eps")
