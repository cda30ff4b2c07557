"""Model builders: a stored or live config (ConfigDict or the plain dict a checkpoint
holds) -> the Flax module or diffusion schedule it describes. Fields added after a
checkpoint was written fall back to their defaults here, in one place."""

from __future__ import annotations

from ldm_jax import diffusion, nets, text


def build_vae(cfg) -> nets.VAE:
    """The first stage from a VAE config (ConfigDict or a checkpoint's config dict)."""
    m = cfg["model"]
    ae = cfg.get("autoencoder") or {}  # checkpoints from before VQ existed lack it
    return nets.VAE(channels=tuple(m["channels"]), latent_ch=m["latent_ch"],
                    num_res_blocks=m["num_res_blocks"], groups=m["groups"],
                    reg=ae.get("reg", "kl"), num_codes=ae.get("codebook_size", 256),
                    codebook_decay=ae.get("codebook_decay", 0.99),
                    dead_threshold=ae.get("dead_code_threshold", 1.0))


def build_unet(model_cfg) -> nets.UNet:
    """The denoiser from a diffusion config's model section."""
    get = model_cfg.get  # checkpoints from before conditioning existed lack its fields
    encoder = None
    if get("conditioning", "none") == "text":
        encoder = text.TextEncoder(width=get("context_dim", 64), layers=get("text_layers", 2),
                                   heads=model_cfg["heads"])
    return nets.UNet(ch=model_cfg["ch"], ch_mult=tuple(model_cfg["ch_mult"]),
                     num_res_blocks=model_cfg["num_res_blocks"], heads=model_cfg["heads"],
                     groups=model_cfg["groups"], conditioning=get("conditioning", "none"),
                     num_classes=get("num_classes", 10), context_tokens=get("context_tokens", 4),
                     context_dim=get("context_dim", 64), text_encoder=encoder)


def build_schedule(diff_cfg) -> diffusion.Schedule:
    """Schedule constants from a diffusion config's diffusion section."""
    return diffusion.make_schedule(diff_cfg["schedule"], diff_cfg["timesteps"],
                                   diff_cfg["beta_start"], diff_cfg["beta_end"],
                                   zero_terminal_snr=diff_cfg.get("zero_terminal_snr", False))


def prediction(diff_cfg) -> str:
    """What the U-Net predicts (checkpoints from before the option existed: eps)."""
    return diff_cfg.get("prediction", "eps")
