"""ldm_jax: Latent Diffusion Models in JAX/Flax on MNIST, against the same diffusion on pixels."""

__version__ = "0.1.0"
