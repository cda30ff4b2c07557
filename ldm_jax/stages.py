"""What each stage trains: its model init, its loss and its data (one Task per stage).

vae: the first stage (KL or VQ autoencoder). ldm: diffusion on the VAE's latents, which it
encodes once at start-up. pixel: the same diffusion on 28x28 pixels. classifier: the MNIST
feature network behind FID. distill, distill_pixel: a few-step consistency student of the
ldm or pixel model. The loop in `ldm_jax.train` runs any Task.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import checkpoints, configs, consistency, data, diffusion, features, models, nets, text

Array = jax.Array
PyTree = Any
# (params, model_state, batch, key) -> (loss, (metrics, new model_state)); in training the
# batch also holds 'step', the int32 step being taken (the VAE's adversarial term reads it).
LossFn = Callable[[PyTree, PyTree, dict, Array], tuple[Array, tuple[dict, PyTree]]]


@dataclasses.dataclass(frozen=True)
class Task:
    """What a stage brings to the shared loop."""
    init: Callable[[Array], tuple[PyTree, PyTree]]  # key -> (params, model_state)
    loss_fn: LossFn  # (params, model_state, batch, key) -> (loss, (metrics, model_state))
    get_batch: Callable[[int], dict]  # step -> this process's share of the global batch
    # {'params': ema_params, **model_state} -> JSON saved beside each checkpoint
    meta: Callable[[dict], dict] = lambda variables: {}
    # The whole training set the batches are drawn from ({name: [N, ...]}), which the loop
    # keeps on the device on an accelerator (see `batcher` for the batches of a step).
    arrays: dict = dataclasses.field(default_factory=dict)


def stateless(loss_fn, init_params):
    """Adapts a (params, batch, key) -> (loss, metrics) loss and a key -> params init to
    a Task's signatures, for stages with no model state."""
    def init(key):
        return init_params(key), {}

    def loss(params, model_state, batch, key):
        value, metrics = loss_fn(params, batch, key)
        return value, (metrics, model_state)
    return init, loss


def kl_divergence(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example: [B, s, s, c] -> [B]."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def reconstruction_nll(out: Array, x: Array, likelihood: str) -> Array:
    """-log p(x | decoder output), summed over pixels, up to a constant: [B].
    gaussian: sum of squares of out - x. bernoulli: out are logits of the intensity
    t = (x + 1) / 2 in [0, 1], and the cross-entropy softplus(out) - t out is minimal where
    sigmoid(out) = t, so exact 0 and 255 (most of MNIST) pull the logits to -inf and +inf.
    hurdle: the cross-entropy of 'the pixel is not 0' (channel 0), plus for nonzero pixels
    the bernoulli term of their intensity (channel 1). hurdle_logit: the same 'not 0' term,
    plus for nonzero pixels a Gaussian NLL of logit(t) with mean channel 1, log scale channel 2."""
    if likelihood == "gaussian":
        return jnp.sum(jnp.square(out - x), axis=(1, 2, 3))
    t = (x + 1.0) / 2.0
    if likelihood == "bernoulli":
        return jnp.sum(jax.nn.softplus(out) - t * out, axis=(1, 2, 3))
    ink_logit, intensity = out[..., :1], out[..., 1:2]
    ink = (t > 0.5 / 255).astype(out.dtype)  # exact 0 in uint8
    nll = jax.nn.softplus(ink_logit) - ink * ink_logit
    if likelihood == "hurdle":
        return jnp.sum(nll + ink * (jax.nn.softplus(intensity) - t * intensity), axis=(1, 2, 3))
    tc = jnp.clip(t, 0.5 / 255, 254.5 / 255)  # finite logits at 0 (masked) and 255
    log_s = jnp.clip(out[..., 2:3], -3.0, 2.0)
    gauss = 0.5 * jnp.square((jnp.log(tc) - jnp.log1p(-tc) - intensity) * jnp.exp(-log_s)) + log_s
    return jnp.sum(nll + ink * gauss, axis=(1, 2, 3))


def vae_loss(model: nets.VAE, c, perceptual, disc, params, model_state, batch, key):
    """First-stage loss, per image, averaged over the batch:
    1. reconstruction: reconstruction_nll under the model's likelihood, plus l1_weight times
       the L1 distance of the image on the [0, 1] scale (it pulls toward the median);
    2. perceptual (if perceptual_weight > 0): classifier-feature distance to the input;
    3. regulariser: kl_weight * KL(q(z|x) || N(0, I)) for kl, commitment_weight *
       ||z_e - sg(q)||^2 for vq (whose codebook takes its EMA step in model_state);
    4. adversarial (if disc is a discriminator, params[DISCRIMINATOR] its parameters):
       adversarial_terms, on from step loss.adversarial_start."""
    x = batch["image"]  # [B, 28, 28, 1]
    z_key, vq_key = jax.random.split(key)
    vae_params, disc_params = models.split_discriminator(params)
    to_image = functools.partial(nets.decoder_image, likelihood=model.likelihood, mean=True)

    def forward(p):  # VAE params -> (decoder output [B, 28, 28, 1], (info, new model_state))
        (recon, info), new_state = model.apply({"params": p, **model_state}, x, z_key,
                                               rngs={"vq": vq_key}, mutable=list(model_state))
        return recon, (info, new_state)

    def reconstruction(out):  # 1 + 2: L_rec, which the adversarial weight balances against
        rec = jnp.mean(reconstruction_nll(out, x, model.likelihood))
        metrics = dict(recon=rec)
        if c.loss.l1_weight > 0:
            metrics["l1"] = jnp.mean(jnp.sum(jnp.abs(to_image(out) - x), axis=(1, 2, 3))) / 2
            rec = rec + c.loss.l1_weight * metrics["l1"]
        if c.loss.perceptual_weight > 0:
            metrics["perceptual"] = jnp.mean(perceptual(to_image(out), x))
            rec = rec + c.loss.perceptual_weight * metrics["perceptual"]
        return rec, metrics

    if disc is None:
        recon, (info, new_state) = forward(vae_params)
        loss, metrics = reconstruction(recon)
    else:  # the same forward pass, differentiable in the decoder's last kernel for 4.
        layer = nets.last_decoder_layer(vae_params)
        recon, last_layer_vjp, (info, new_state) = jax.vjp(
            lambda w: forward(_replace(vae_params, layer, w)), _get(vae_params, layer),
            has_aux=True)
        loss, rec_vjp, metrics = jax.vjp(reconstruction, recon, has_aux=True)
        rec_cotangent = rec_vjp(jnp.ones_like(loss))[0]  # dL_rec / dx_hat
    if model.reg == "kl":
        metrics["kl"] = jnp.mean(kl_divergence(info["mean"], info["logvar"]))
        loss = loss + c.loss.kl_weight * metrics["kl"]
    else:
        metrics.update({k: info[k] for k in ("commit", "perplexity", "codes_used", "restarted")})
        loss = loss + c.autoencoder.commitment_weight * info["commit"]
    if disc is not None:
        adversarial, adv_metrics = adversarial_terms(
            disc, disc_params, x, recon, rec_cotangent, last_layer_vjp, c.loss, batch["step"],
            to_image)
        loss = loss + adversarial
        metrics.update(adv_metrics)
    return loss, (metrics, new_state)


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _replace(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of nested dicts `tree` with the leaf at `path` replaced by value."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Discriminator hinge loss (Lim & Ye 2017; Esser et al. 2021):
    (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(rec_grad: Array, g_grad: Array, eps: float = 1e-4,
                    max_weight: float = 1e4) -> Array:
    """lambda = ||grad_L L_rec|| / (||grad_L L_G|| + eps), clipped to [0, max_weight], from
    the gradients of both losses at the decoder's last layer L (Esser et al. 2021, Eq. 7)."""
    norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(g)))
    return jnp.clip(norm(rec_grad) / (norm(g_grad) + eps), 0.0, max_weight)


def adversarial_terms(disc: nets.PatchDiscriminator, disc_params, x: Array, recon: Array,
                      rec_cotangent: Array, last_layer_vjp, loss_cfg, step: Array,
                      to_image=lambda out: out):
    """The adversarial part of the first-stage loss, and its metrics:

        on(step) * (adversarial_weight * sg(lambda) * L_G(theta; sg(phi)) + L_D(phi; sg(x_hat)))

    L_G = -mean D(x_hat) reaches only the VAE (theta): the discriminator's parameters phi
    are stopped in it. L_D, the hinge loss on x and the stopped x_hat, reaches only phi. So
    one gradient of the sum updates both players, neither through the other's loss.
    recon is the decoder's output, to_image maps it to x_hat (nets.decoder_image).
    lambda is adaptive_weight of dL_rec/dout (rec_cotangent [B, 28, 28, 1]) and dL_G/dout,
    each pulled back to the decoder's last kernel by last_layer_vjp. Before
    loss_cfg.adversarial_start both terms are exactly 0 and the discriminator does not train.
    """
    frozen = jax.lax.stop_gradient(disc_params)
    g_loss, g_vjp = jax.vjp(lambda r: -jnp.mean(disc.apply({"params": frozen}, to_image(r))),
                            recon)
    lam = jax.lax.stop_gradient(adaptive_weight(
        last_layer_vjp(rec_cotangent)[0], last_layer_vjp(g_vjp(jnp.ones_like(g_loss))[0])[0]))
    fake = jax.lax.stop_gradient(to_image(recon))
    logits = disc.apply({"params": disc_params}, jnp.concatenate([x, fake]))  # [2B, 7, 7, 1]
    d_loss = hinge_d_loss(logits[:len(x)], logits[len(x):])
    on = step >= loss_cfg.adversarial_start
    weight = jnp.where(on, loss_cfg.adversarial_weight * lam, 0.0)
    metrics = dict(g_loss=g_loss, disc_loss=d_loss, adv_lambda=lam, adv_weight=weight,
                   logits_real=jnp.mean(logits[:len(x)]), logits_fake=jnp.mean(logits[len(x):]))
    return weight * g_loss + jnp.where(on, d_loss, 0.0), metrics


def encode_dataset(vae: nets.VAE, variables: dict, images: np.ndarray, batch: int = 1000):
    """float images [N, 28, 28, 1] -> posterior (mean, std), each [N, s, s, c] numpy
    (for vq: the pre-quantisation latent and std 0)."""
    encode = jax.jit(lambda v, x: vae.apply(v, x, method=nets.VAE.encode))
    means, stds = [], []
    for i in range(0, len(images), batch):
        mean, logvar = encode(variables, images[i:i + batch])
        means.append(np.asarray(mean))
        stds.append(np.asarray(jnp.exp(0.5 * logvar)))
    return np.concatenate(means), np.concatenate(stds)


def latent_stats(vae: nets.VAE, variables: dict, images: np.ndarray, seed: int = 0) -> dict:
    """Std of posterior means and of posterior samples over `images` (Rombach et al. 2022,
    Sec. 4.3.2: latents are rescaled by 1/std to unit variance before diffusion)."""
    mean, std = encode_dataset(vae, variables, images)
    sample = mean + std * np.random.default_rng(seed).standard_normal(mean.shape, np.float32)
    return dict(latent_std_mean=float(mean.std()), latent_std_sample=float(sample.std()),
                latent_shape=list(mean.shape[1:]))


def train_split(c) -> tuple[np.ndarray, np.ndarray]:
    """uint8 training images [N, 28, 28] and labels [N], without the last data.holdout."""
    images, labels = data.load(c.data.source, "train", c.data.dir or None)
    if c.data.holdout >= len(images):
        raise configs.ConfigError(f"data.holdout={c.data.holdout} leaves no training images "
                                  f"of {len(images)}")
    keep = len(images) - c.data.holdout
    return images[:keep], labels[:keep]


def _train_images(c) -> tuple[np.ndarray, np.ndarray]:
    images, labels = train_split(c)
    n = c.data.max_examples or len(images)
    return data.to_float(images[:n]), labels[:n].astype(np.int32)


def batcher(c, arrays: dict[str, np.ndarray], shuffle: str = "jax") -> Callable[[int], dict]:
    """step -> this process's share of the step's global batch of arrays (epoch-wise
    shuffles from (seed, epoch), so any process, device count or resume draws the same)."""
    n = len(next(iter(arrays.values())))

    def get_batch(step: int) -> dict:
        idx = data.batch_indices(n, c.data.batch_size, c.seed, step, shuffle)
        idx = data.process_slice(idx, jax.process_index(), jax.process_count())
        return {k: v[idx] for k, v in arrays.items()}
    return get_batch


def _data(c, arrays: dict[str, np.ndarray]) -> dict:
    """The Task fields that give the loop its data."""
    return dict(get_batch=batcher(c, arrays), arrays=arrays)


def vae_task(c, workdir: str) -> Task:
    images, _ = _train_images(c)
    model = models.build_vae(c)
    disc = models.build_discriminator(c)
    stats_images = images[:10_000]
    perceptual = None
    if c.loss.perceptual_weight > 0:
        perceptual = features.perceptual_loss_fn()

    def init(key):
        variables = model.init(key, images[:1], key)
        params = variables["params"]
        if disc is not None:  # a key of its own, so weight 0 keeps the old params tree
            params = {**params, models.DISCRIMINATOR: disc.init(
                jax.random.fold_in(key, 1), images[:1])["params"]}
        return params, {k: v for k, v in variables.items() if k != "params"}

    def meta(variables):
        variables = {**variables, "params": models.split_discriminator(variables["params"])[0]}
        return latent_stats(model, variables, stats_images, c.seed)
    return Task(
        init=init, loss_fn=functools.partial(vae_loss, model, c, perceptual, disc),
        **_data(c, {"image": images}), meta=meta)


def check_first_stage_holdout(vae_cfg: dict, c, workdir: str) -> None:
    """Refuses an LDM whose VAE trained on images the LDM holds out for validation: its
    val scores would see them through the decoder."""
    if (n := data.trained_on(vae_cfg["data"])) > data.MNIST_TRAIN_IMAGES - c.data.holdout:
        raise configs.ConfigError(
            f"the VAE in {workdir}/vae trained on the first {n:,} training images, into the last "
            f"{c.data.holdout:,} this LDM holds out (data.holdout); train the VAE with "
            f"data.holdout >= {c.data.holdout} in a new workdir")


def diffusion_data(c, workdir: str) -> tuple[dict, dict, float]:
    """(arrays, meta, scale) a diffusion stage trains on: pixels, or for an LDM the latents
    of its VAE (posterior mean and std), the latent scale and the VAE it is bound to."""
    images, labels = _train_images(c)
    if c.stage == "ldm":
        # An LDM is bound to one VAE: its first checkpoint records the VAE step, digest and
        # latent scale, and every resume (and benchmark) uses exactly those, never whatever
        # workdir/vae holds now.
        bound = checkpoints.stored_meta(os.path.join(workdir, "ldm"))
        vae, vae_vars, vae_cfg, vae_meta = checkpoints.load_vae(workdir,
                                                                bound and bound["vae_step"])
        check_first_stage_holdout(vae_cfg, c, workdir)
        vae_digest = checkpoints.tree_digest(vae_vars)
        if bound and bound.get("vae_digest", vae_digest) != vae_digest:
            raise configs.ConfigError(f"{workdir}/vae step {bound['vae_step']} is not the VAE "
                                      f"the LDM in {workdir}/ldm was trained on (digest differs)")
        mean, std = encode_dataset(vae, vae_vars, images)
        scale = (bound["scale_factor"] if bound
                 else 1.0 / vae_meta[f"latent_std_{c.latent.posterior}"])
        arrays = {"mean": mean, "std": std} if c.latent.posterior == "sample" else {"mean": mean}
        meta = dict(scale_factor=scale, vae_step=vae_meta["step"], vae_digest=vae_digest,
                    latent_shape=list(mean.shape[1:]))
    else:
        arrays, meta, scale = {"image": images}, {}, 1.0
    if c.model.conditioning != "none":
        arrays["label"] = labels
    return arrays, meta, scale


def clean_batch(batch: dict, key: Array, scale: float) -> Array:
    """The diffusion's x_0 of a batch: pixels, or a scaled latent (a posterior sample
    z = mean + std * eps where the batch holds the std)."""
    x0 = batch["image"] if "image" in batch else batch["mean"]
    if "std" in batch:
        x0 = x0 + batch["std"] * jax.random.normal(key, x0.shape)
    return x0 * scale


def diffusion_task(c, workdir: str) -> Task:
    arrays, meta, scale = diffusion_data(c, workdir)
    conditional = c.model.conditioning != "none"
    sched = models.build_schedule(c.diffusion)
    unet = models.build_unet(c.model)
    example = next(iter(arrays.values()))[:1]
    configs.check_unet_input(c, example.shape[1], example.shape[3])
    prompts = c.model.conditioning == "text"
    # Text: every step draws, for each label, a prompt from the training (template,
    # spelling) pairs, on the device (tokens of all of them: [10, K, L]).
    table = jnp.asarray(text.prompt_table()) if prompts else None

    def loss_fn(params, batch, key):
        z_key, d_key, y_key = jax.random.split(key, 3)
        x0 = clean_batch(batch, z_key, scale)
        apply = models.unet_fn(unet, c.model, params)
        if prompts:  # classifier-free guidance: some prompts become the empty prompt
            y = text.sample_prompts(y_key, batch["label"], table, c.model.label_dropout)
            net_fn = lambda x, t: apply(x, t, y)
        elif conditional:  # classifier-free guidance: some labels become the null label
            y = diffusion.drop_labels(y_key, batch["label"], c.model.label_dropout,
                                      c.model.num_classes)
            net_fn = lambda x, t: apply(x, t, y)
        else:
            net_fn = apply
        loss = jnp.mean(diffusion.training_losses(
            net_fn, sched, x0, d_key, prediction=c.diffusion.prediction,
            weighting=c.diffusion.loss_weighting, min_snr_gamma=c.diffusion.min_snr_gamma))
        return loss, {}

    init_y = jnp.zeros((1,), jnp.int32) if conditional else None
    if prompts:
        init_y = jnp.asarray(text.encode(""))[None]
    init, loss_fn = stateless(loss_fn, lambda key: unet.init(
        key, example, jnp.zeros((1,), jnp.int32), init_y)["params"])
    return Task(init=init, loss_fn=loss_fn, **_data(c, arrays),
                meta=lambda variables: meta)


def teacher_eps_fn(unet: nets.UNet, tc, sched: diffusion.Schedule, teacher: dict,
                   labels: Array | None = None, guidance: float = 0.0,
                   autoguidance: float | None = None, min_t: int | None = None) -> diffusion.EpsFn:
    """The eps of a teacher's default sampler: autoguided by teacher['guide'] (if any) with
    w = autoguidance at t >= min_t (None: its sample.guide_weight, sample.guide_min_t) and,
    for class labels, classifier-free guided with w = guidance."""
    eps_of = lambda p: diffusion.eps_fn_from_model(models.unet_fn(unet, tc.model, p), sched,
                                                   tc.diffusion.prediction)
    eps_fn = eps_of(teacher["unet"])
    if "guide" in teacher:
        w = tc.sample.guide_weight if autoguidance is None else autoguidance
        m = tc.sample.guide_min_t if min_t is None else min_t
        eps_fn = diffusion.autoguided_eps_fn(eps_fn, eps_of(teacher["guide"]), w, m)
    if labels is not None:
        eps_fn = diffusion.guided_eps_fn(eps_fn, labels, tc.model.num_classes, guidance)
    return eps_fn


def student_x0_fn(unet: nets.UNet, tc, sched: diffusion.Schedule, params,
                  labels: Array | None = None, w: Array | None = None) -> consistency.X0Fn:
    """(z_t, t) -> the x_0 a U-Net of the teacher's architecture predicts (at labels, and
    at guidance weights w [B] for a student that takes them)."""
    apply = models.unet_fn(unet, tc.model, params)
    extra = (labels, w) if w is not None else () if labels is None else (labels,)
    return lambda z, t: diffusion.predict_xstart(sched, apply(z, t, *extra), z, t,
                                                 tc.diffusion.prediction)


def weight_embedding_params(unet: nets.UNet, key: Array, example: Array, y) -> dict:
    """The fresh w-embedding layers of a student that takes its guidance weight; the rest
    of its U-Net is its teacher's, and the zero output layer keeps it so at start."""
    t, w = jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32)
    params = unet.init(key, example, t, y, w)["params"]
    return {k: v for k, v in params.items() if k.startswith("weight_emb")}


def guidance_weights(c, key: Array, batch: int) -> Array | None:
    """w ~ U[distill.weight_min, weight_max] [B] for a student that takes its guidance
    weight (configs.student_takes_weight), else None."""
    if not configs.student_takes_weight(c.distill):
        return None
    return jax.random.uniform(key, (batch,), minval=c.distill.weight_min,
                              maxval=c.distill.weight_max)


def _load_teacher(c, workdir: str):
    """(teacher config, {'unet': params[, 'guide': params]}, meta to store): the teacher a
    student starts from, or the very one its checkpoints were distilled from."""
    bound = checkpoints.stored_meta(os.path.join(workdir, c.stage))
    teacher_dir = os.path.join(workdir, configs.STUDENTS[c.stage])
    stored = checkpoints.stored_meta(teacher_dir)
    if stored is not None and not (stored.get("digests") or {}).get("tree"):  # older than digests
        raise configs.ConfigError(f"{teacher_dir} step {stored.get('step')} was saved without "
                                  "weight digests, so no student can be bound to it; train "
                                  "the teacher again in a new workdir")
    params, t_cfg, t_meta = checkpoints.load_teacher(workdir, c.stage, bound)
    tc = checkpoints.config_from_stored(t_cfg)
    if tc.model.conditioning == "text":
        raise configs.ConfigError("distilling a text-conditioned teacher is not supported; "
                                  "distil an unconditional or class-conditional model")
    if not c.distill.intervals < tc.diffusion.timesteps:
        raise configs.ConfigError(f"distill.intervals={c.distill.intervals} must be below the "
                                  f"teacher's {tc.diffusion.timesteps} timesteps")
    guide = checkpoints.teacher_guide(workdir, t_cfg, t_meta["step"])
    w = c.distill.autoguidance  # negative: the teacher's own (0 without a guide)
    if w > 0 and guide is None:
        raise configs.ConfigError(f"distill.autoguidance={w:g} needs a teacher with an "
                                  "autoguidance guide (its sample.guide_weight > 0 and "
                                  "guide_step kept); --config.distill.autoguidance=-1 takes "
                                  "the teacher's own")
    # A student of an unconditional teacher that takes its weight takes autoguidance's.
    weighted = configs.student_takes_weight(c.distill) and tc.model.conditioning == "none"
    if weighted and guide is None:
        raise configs.ConfigError("distill.weight_max > weight_min makes the student of an "
                                  "unconditional teacher take its autoguidance weight, but "
                                  "this teacher keeps no autoguidance guide")
    if w < 0:
        w = tc.sample.guide_weight if guide is not None else 0.0
    m = c.distill.guide_min_t if c.distill.guide_min_t >= 0 else tc.sample.guide_min_t
    if m >= tc.diffusion.timesteps:
        raise configs.ConfigError(f"distill.guide_min_t={m} must be below the teacher's "
                                  f"{tc.diffusion.timesteps} timesteps")
    # At w = 0 the guide's U-Net call would be multiplied by zero: leave it out.
    teacher = {"unet": params, **({"guide": guide} if w > 0 or weighted else {})}
    meta = dict(teacher_stage=tc.stage, teacher_step=t_meta["step"],
                teacher_digest=t_meta["digests"]["tree"], autoguidance=w, guide_min_t=m)
    return tc, teacher, meta


def student_adversary(c, tc, workdir: str, data_meta: dict, scale: float):
    """(discriminator, to_image) for distill.adversarial_weight > 0, else (None, None):
    to_image maps the diffusion's x_0 to images in [-1, 1], through the teacher's frozen
    VAE decoder for an LDM, as they are for pixels."""
    if c.distill.adversarial_weight <= 0:
        return None, None
    disc = nets.PatchDiscriminator(tuple(c.distill.disc_channels))
    if tc.stage != "ldm":
        return disc, lambda x: x
    vae, vae_vars, _, _ = checkpoints.load_vae(workdir, data_meta["vae_step"],
                                               data_meta["vae_digest"])
    return disc, lambda z: vae.apply(vae_vars, z / scale, method=nets.VAE.decode)


def student_loss(pred: Array, want: Array, x0: Array, adversary, disc_params, d, step: Array):
    """The distillation loss: mean pseudo-Huber(pred, want), plus with an adversary
    (discriminator, to_image) the hinge-GAN terms of adversarial_terms on images of the
    student's x_0 (pred) against images of the data's (x0), the adaptive weight from both
    losses' gradients at pred."""
    rec, rec_vjp = jax.vjp(lambda p: jnp.mean(consistency.pseudo_huber(p, want)), pred)
    if adversary[0] is None:
        return rec, {}
    disc, to_image = adversary  # d has adversarial_weight and _start, as loss_cfg wants
    # The gradients at pred itself stand in for the decoder's last layer: an identity vjp.
    adv, metrics = adversarial_terms(disc, disc_params, to_image(x0), pred,
                                     rec_vjp(jnp.ones_like(rec))[0], lambda g: (g,), d, step,
                                     to_image)
    return rec + adv, dict(metrics, distill=rec)


def distill_task(c, workdir: str) -> Task:
    """Latent consistency distillation (Luo et al. 2023) of workdir's ldm or pixel model: the
    student starts as the teacher and regresses on an EMA target one guided teacher step
    closer to the data (consistency.distillation_pair), under a pseudo-Huber loss; with
    distill.adversarial_weight > 0 a discriminator also judges its x_0 (student_loss)."""
    tc, teacher, teacher_meta = _load_teacher(c, workdir)
    arrays, data_meta, scale = diffusion_data(tc, workdir)
    sched, unet = models.build_schedule(tc.diffusion), models.build_unet(tc.model)
    student = models.build_unet(tc.model, configs.student_takes_weight(c.distill))
    grid = jnp.asarray(consistency.student_grid(tc.diffusion.timesteps, c.distill.intervals))
    conditional, ema = tc.model.conditioning != "none", c.distill.target_ema
    bias = c.distill.low_noise_bias
    probs = jnp.asarray(consistency.interval_probs(c.distill.intervals, bias)) if bias else None
    adversary = student_adversary(c, tc, workdir, data_meta, scale)

    def loss_fn(params, model_state, batch, key):
        params, disc_params = models.split_discriminator(params)
        z_key, y_key, d_key = jax.random.split(key, 3)
        y = diffusion.drop_labels(y_key, batch["label"], tc.model.label_dropout,
                                  tc.model.num_classes) if conditional else None
        x0 = clean_batch(batch, z_key, scale)
        # fold_in, not a fourth split: the other students' keys stay as they were
        w = guidance_weights(c, jax.random.fold_in(key, 3), x0.shape[0])
        cfg_w, auto_w = c.distill.guidance, teacher_meta["autoguidance"]
        if w is not None:  # the weight the student takes: CFG's for a class teacher
            wb = w.reshape(-1, *(1,) * (x0.ndim - 1))
            cfg_w, auto_w = (wb, auto_w) if conditional else (cfg_w, wb)
        eps_fn = teacher_eps_fn(unet, tc, sched, model_state["teacher"], y, cfg_w, auto_w,
                                teacher_meta["guide_min_t"])
        target = model_state["target"] if ema > 0 else jax.lax.stop_gradient(params)
        pred, want = consistency.distillation_pair(
            student_x0_fn(student, tc, sched, params, y, w),
            student_x0_fn(student, tc, sched, target, y, w),
            eps_fn, sched, grid, x0, d_key, tc.diffusion.clip_x0, probs)
        if ema > 0:
            model_state = dict(model_state, target=optax.incremental_update(
                jax.lax.stop_gradient(params), target, 1.0 - ema))
        loss, metrics = student_loss(pred, want, x0, adversary, disc_params, c.distill,
                                     batch.get("step", 0))
        return loss, (metrics, model_state)

    def init(key):  # the student starts as its teacher
        params = teacher["unet"]
        example = jnp.asarray(next(iter(arrays.values()))[:1], jnp.float32)
        if student.weight_input:
            y = jnp.zeros((1,), jnp.int32) if conditional else None
            params = {**params, **weight_embedding_params(student, key, example, y)}
        state = {"teacher": teacher, **({"target": params} if ema > 0 else {})}
        if adversary[0] is not None:  # beside the U-Net, outside the EMA target
            disc_params = adversary[0].init(key, adversary[1](example))["params"]
            params = {**params, models.DISCRIMINATOR: disc_params}
        return params, state
    meta = dict(data_meta, **teacher_meta, intervals=c.distill.intervals,
                guidance=c.distill.guidance)
    return Task(init=init, loss_fn=loss_fn, **_data(c, arrays), meta=lambda variables: meta)


def classifier_accuracy(params, images: np.ndarray, labels: np.ndarray, feature_dim: int = 128,
                        batch: int = 1000) -> float:
    model = nets.Classifier(feature_dim=feature_dim)
    logits_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    preds = [np.asarray(jnp.argmax(logits_fn(params, images[i:i + batch]), -1))
             for i in range(0, len(images), batch)]
    return float(np.mean(np.concatenate(preds) == labels))


def classifier_task(c, workdir: str) -> Task:
    images, labels = _train_images(c)
    test_images, test_labels = data.load(c.data.source, "test", c.data.dir or None)
    test_images = data.to_float(test_images)
    model = nets.Classifier(feature_dim=c.model.feature_dim)

    def loss_fn(params, batch, key):
        x = batch["image"]
        # Random shifts of up to 2 pixels: the only augmentation, enough for >99.3%.
        shift = jax.random.randint(key, (2,), -2, 3)
        x = jnp.roll(x, (shift[0], shift[1]), axis=(1, 2))
        logits = model.apply({"params": params}, x)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
        return loss, dict(accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]))

    init, loss_fn = stateless(loss_fn, lambda key: model.init(key, images[:1])["params"])
    return Task(
        init=init, loss_fn=loss_fn, **_data(c, {"image": images, "label": labels}),
        meta=lambda variables: dict(test_accuracy=classifier_accuracy(
            variables["params"], test_images, test_labels, c.model.feature_dim)))


TASKS = {"vae": vae_task, "ldm": diffusion_task, "pixel": diffusion_task,
         "classifier": classifier_task, "distill": distill_task, "distill_pixel": distill_task}
