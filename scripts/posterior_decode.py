"""Do the latents' noise or the sampler dim the strokes? Decodes the 2,000 holdout images'
posterior means and two posterior samples (what the LDM is trained on) and prints the pixel
shares (exact 0, 1-15, above 250) of each.

    python scripts/posterior_decode.py runs/demo [more workdirs]
"""
import sys

import jax
import numpy as np

from ldm_jax import checkpoints, data, metrics, nets, score, stages


def shares(images: np.ndarray) -> str:
    p = metrics.pixel_stats(images)
    return (f"0 {100 * p['zero']:.2f} %, 1-15 {100 * p['haze']:.2f} %, "
            f"> 250 {100 * p['saturated']:.2f} %")


def main(workdirs: list[str]) -> None:
    real = score.split_images("val", 2000)[:2000]
    print("holdout images:", shares(real))
    for workdir in workdirs:
        score.require_val_unseen(workdir, ["vae"], 2000, "posterior_decode")
        vae, variables, _, _ = checkpoints.load_vae(workdir)
        mean, std = stages.encode_dataset(vae, variables, data.to_float(real))
        decode = jax.jit(lambda z: vae.apply(variables, z, method=nets.VAE.decode))
        print(workdir, "posterior std (mean):", float(std.mean()))
        print("  decode(mean):  ", shares(data.to_uint8(decode(mean))))
        for seed in (0, 1):
            noise = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
            print(f"  decode(sample {seed}):", shares(data.to_uint8(decode(mean + std * noise))))


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/demo"])
