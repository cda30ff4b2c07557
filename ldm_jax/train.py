"""Training for every stage: one pure jitted step, one loop, Orbax checkpoints.

    python -m ldm_jax.train --stage=vae --workdir=runs/demo [--preset=cpu-quick]
    python -m ldm_jax.train --stage=ldm --workdir=runs/demo      # needs runs/demo/vae
    python -m ldm_jax.train --stage=pixel --workdir=runs/demo    # the pixel-space baseline
    python -m ldm_jax.train --stage=classifier --workdir=runs/demo

Each stage writes workdir/<stage>/{checkpoints/, metrics.jsonl}. Rerunning the same
command resumes from the latest complete checkpoint. Data parallel over every device of
every process: a 1-D 'data' mesh, batch sharded, parameters replicated, plain jax.jit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ldm_jax import cli, configs, data, diffusion, nets

Array = jax.Array
PyTree = Any
# (params, model_state, batch, key) -> (loss, (metrics, new model_state))
LossFn = Callable[[PyTree, PyTree, dict, Array], tuple[Array, tuple[dict, PyTree]]]

# Config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("preset", "train.steps", "train.max_minutes", "train.log_every",
                    "train.ckpt_every", "train.keep_checkpoints", "train.skip_nonfinite")


class TrainingError(RuntimeError):
    """Training had to stop (non-finite values); the message names the step."""


class TrainState(train_state.TrainState):
    ema_params: PyTree
    # Non-gradient model variables updated by the loss (the VQ codebook's 'vq' collection).
    model_state: PyTree = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- Update


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    lr = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
        end_value=optim.lr * optim.final_lr_frac)
    clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(lr, optim.b1, optim.b2, weight_decay=optim.weight_decay))


def ema_decay_at(step: Array, decay: float) -> Array:
    """Warmed-up EMA decay min(decay, (1 + s) / (10 + s)), so short runs are not noise."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, key: Array, *, loss_fn: LossFn,
               ema_decay: float) -> tuple[TrainState, dict]:
    """One optimizer step. A non-finite loss or gradient leaves the parameters untouched
    (the step counter still advances) and reports finite=False."""
    (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch, key)
    new = state.apply_gradients(grads=grads)
    new = new.replace(model_state=model_state, ema_params=optax.incremental_update(
        new.params, state.ema_params, 1.0 - ema_decay_at(state.step, ema_decay)))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skipped = state.replace(step=state.step + 1)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite,
                   param_norm=optax.tree.norm(new.params),
                   update_norm=optax.tree.norm(jax.tree.map(jnp.subtract, new.params,
                                                              state.params)))
    return new, metrics


# ----------------------------------------------------------------------------- Stages


@dataclasses.dataclass(frozen=True)
class Task:
    """What a stage brings to the shared loop."""
    init: Callable[[Array], tuple[PyTree, PyTree]]  # key -> (params, model_state)
    loss_fn: LossFn  # (params, model_state, batch, key) -> (loss, (metrics, model_state))
    get_batch: Callable[[int], dict]  # step -> this process's share of the global batch
    # {'params': ema_params, **model_state} -> JSON saved beside each checkpoint
    meta: Callable[[dict], dict] = lambda variables: {}


def stateless(loss_fn, init_params):
    """Adapts a (params, batch, key) -> (loss, metrics) loss and a key -> params init to
    a Task's signatures, for stages with no model state."""
    def init(key):
        return init_params(key), {}

    def loss(params, model_state, batch, key):
        value, metrics = loss_fn(params, batch, key)
        return value, (metrics, model_state)
    return init, loss


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
    get = model_cfg.get  # checkpoints from before conditioning existed lack its fields
    return nets.UNet(ch=model_cfg["ch"], ch_mult=tuple(model_cfg["ch_mult"]),
                     num_res_blocks=model_cfg["num_res_blocks"], heads=model_cfg["heads"],
                     groups=model_cfg["groups"], conditioning=get("conditioning", "none"),
                     num_classes=get("num_classes", 10), context_tokens=get("context_tokens", 4),
                     context_dim=get("context_dim", 64))


def build_schedule(diff_cfg) -> diffusion.Schedule:
    return diffusion.make_schedule(diff_cfg["schedule"], diff_cfg["timesteps"],
                                   diff_cfg["beta_start"], diff_cfg["beta_end"])


def kl_divergence(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example: [B, s, s, c] -> [B]."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def vae_loss(model: nets.VAE, c, perceptual, params, model_state, batch, key):
    """First-stage loss, per image, averaged over the batch:
    1. reconstruction: sum of squares over pixels;
    2. perceptual (if perceptual_weight > 0): classifier-feature distance to the input;
    3. regulariser: kl_weight * KL(q(z|x) || N(0, I)) for kl, commitment_weight *
       ||z_e - sg(q)||^2 for vq (whose codebook takes its EMA step in model_state)."""
    x = batch["image"]  # [B, 28, 28, 1]
    z_key, vq_key = jax.random.split(key)
    (recon, info), new_state = model.apply({"params": params, **model_state}, x, z_key,
                                           rngs={"vq": vq_key}, mutable=list(model_state))
    rec = jnp.mean(jnp.sum(jnp.square(recon - x), axis=(1, 2, 3)))
    metrics = dict(recon=rec)
    loss = rec
    if c.loss.perceptual_weight > 0:
        metrics["perceptual"] = jnp.mean(perceptual(recon, x))
        loss = loss + c.loss.perceptual_weight * metrics["perceptual"]
    if model.reg == "kl":
        metrics["kl"] = jnp.mean(kl_divergence(info["mean"], info["logvar"]))
        loss = loss + c.loss.kl_weight * metrics["kl"]
    else:
        metrics.update({k: info[k] for k in ("commit", "perplexity", "codes_used", "restarted")})
        loss = loss + c.autoencoder.commitment_weight * info["commit"]
    return loss, (metrics, new_state)


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


def _train_images(c) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.load(c.data.source, "train", c.data.dir or None)
    n = c.data.max_examples or len(images)
    return data.to_float(images[:n]), labels[:n].astype(np.int32)


def _batcher(c, arrays: dict[str, np.ndarray]) -> Callable[[int], dict]:
    n = len(next(iter(arrays.values())))

    def get_batch(step: int) -> dict:
        idx = data.batch_indices(n, c.data.batch_size, c.seed, step)
        idx = data.process_slice(idx, jax.process_index(), jax.process_count())
        return {k: v[idx] for k, v in arrays.items()}
    return get_batch


def vae_task(c, workdir: str) -> Task:
    images, _ = _train_images(c)
    model = build_vae(c)
    stats_images = images[:10_000]
    perceptual = None
    if c.loss.perceptual_weight > 0:
        from ldm_jax import features  # pylint: disable=import-outside-toplevel
        perceptual = features.perceptual_loss_fn()

    def init(key):
        variables = model.init(key, images[:1], key)
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}
    return Task(
        init=init, loss_fn=functools.partial(vae_loss, model, c, perceptual),
        get_batch=_batcher(c, {"image": images}),
        meta=lambda variables: latent_stats(model, variables, stats_images, c.seed))


def load_vae(workdir: str):
    """(model, variables, config dict, meta) of the finished VAE in workdir/vae; variables
    is {'params': EMA parameters, **model state (the VQ codebook)}."""
    vae_dir = os.path.join(workdir, "vae")
    restored = load_checkpoint(vae_dir, with_state=True)
    if restored is None:
        raise configs.ConfigError(f"no trained VAE in {vae_dir}; run "
                                  f"`python -m ldm_jax.train --stage=vae --workdir={workdir}` first")
    params, model_state, cfg, meta = restored
    if cfg["stage"] != "vae":
        raise configs.ConfigError(f"{vae_dir} holds a {cfg['stage']!r} checkpoint, not a VAE")
    if not meta.get("finished"):
        raise configs.ConfigError(f"the VAE in {vae_dir} stopped at step {meta['step']} of "
                                  f"{cfg['train']['steps']}; rerun --stage=vae to finish it")
    return build_vae(cfg), {"params": params, **model_state}, cfg, meta


def diffusion_task(c, workdir: str) -> Task:
    images, labels = _train_images(c)
    conditional = c.model.conditioning != "none"
    sched = build_schedule(c.diffusion)
    unet = build_unet(c.model)
    if c.stage == "ldm":
        vae, vae_vars, _, vae_meta = load_vae(workdir)
        mean, std = encode_dataset(vae, vae_vars, images)
        scale = 1.0 / vae_meta[f"latent_std_{c.latent.posterior}"]
        arrays = {"mean": mean, "std": std} if c.latent.posterior == "sample" else {"mean": mean}
        meta = dict(scale_factor=scale, vae_step=vae_meta["step"], latent_shape=list(mean.shape[1:]))
    else:
        arrays, meta, scale = {"image": images}, {}, 1.0
    example = next(iter(arrays.values()))[:1]
    configs.check_unet_input(c, example.shape[1], example.shape[3])
    if conditional:
        arrays["label"] = labels

    def loss_fn(params, batch, key):
        z_key, d_key, y_key = jax.random.split(key, 3)
        x0 = batch["image"] if "image" in batch else batch["mean"]
        if "std" in batch:  # a posterior sample z = mean + std * eps
            x0 = x0 + batch["std"] * jax.random.normal(z_key, x0.shape)
        if conditional:  # classifier-free guidance: some labels become the null label
            y = diffusion.drop_labels(y_key, batch["label"], c.model.label_dropout,
                                      c.model.num_classes)
            eps_fn = lambda x, t: unet.apply({"params": params}, x, t, y)
        else:
            eps_fn = lambda x, t: unet.apply({"params": params}, x, t)
        loss = jnp.mean(diffusion.training_losses(eps_fn, sched, x0 * scale, d_key))
        return loss, {}

    init_y = jnp.zeros((1,), jnp.int32) if conditional else None
    init, loss_fn = stateless(loss_fn, lambda key: unet.init(
        key, example, jnp.zeros((1,), jnp.int32), init_y)["params"])
    return Task(init=init, loss_fn=loss_fn, get_batch=_batcher(c, arrays),
                meta=lambda variables: meta)


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
        init=init, loss_fn=loss_fn, get_batch=_batcher(c, {"image": images, "label": labels}),
        meta=lambda variables: dict(test_accuracy=classifier_accuracy(
            variables["params"], test_images, test_labels, c.model.feature_dim)))


TASKS = {"vae": vae_task, "ldm": diffusion_task, "pixel": diffusion_task,
         "classifier": classifier_task}


# ----------------------------------------------------------------------------- Checkpoint


def checkpoint_manager(stage_dir: str, keep: int = 3, create: bool = True,
                       partial: bool = False) -> ocp.CheckpointManager:
    """Checkpoints of state (Orbax PyTree), config and meta (JSON) under stage_dir/checkpoints.

    partial=True opens them read-only for restoring a subtree (the EMA parameters)."""
    state = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(stage_dir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_handlers=dict(state=state, config=ocp.JsonCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def stored_config(stage_dir: str) -> dict | None:
    """The config JSON of the latest checkpoint in stage_dir, or None if there is none."""
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    mgr = checkpoint_manager(stage_dir, create=False)
    step = mgr.latest_step()
    if step is None:
        return None
    restored = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]


def config_from_stored(stored: dict) -> ml_collections.ConfigDict:
    """A checkpoint's config dict as a ConfigDict, with fields added since it was written
    set to their defaults."""
    c = configs.get_config(stored["stage"], stored.get("preset", "full"))
    flat = _flatten(stored)
    c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                  for k, v in flat.items() if k in _flatten(c.to_dict())})
    return c


def check_resumable(c, stage_dir: str) -> None:
    """A checkpoint in stage_dir must come from the same stage and a compatible config."""
    old = stored_config(stage_dir)
    if old is None:
        return
    if old.get("stage") != c.stage:
        raise configs.ConfigError(f"{stage_dir} holds a {old.get('stage')!r} checkpoint, "
                                  f"not {c.stage!r}; use another workdir")
    # Fields added since the checkpoint was written count as their defaults.
    defaults = configs.get_config(c.stage, old.get("preset", c.preset)).to_dict()
    old_flat, new_flat = {**_flatten(defaults), **_flatten(old)}, _flatten(c.to_dict())
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if k not in RESUMABLE_FIELDS and old_flat.get(k) != new_flat.get(k))
    if diff:
        k = diff[0]
        raise configs.ConfigError(
            f"{stage_dir} was trained with {k}={old_flat.get(k)!r}, not {new_flat.get(k)!r} "
            f"({len(diff)} field(s) differ); use another workdir to train a new model")


def load_checkpoint(stage_dir: str, step: int | None = None, with_state: bool = False):
    """(ema_params, config dict, meta) of a checkpoint, or None if stage_dir has none;
    with_state=True: (ema_params, model_state, config dict, meta).

    Restores only the EMA parameters (and the model state), onto this process's first
    device, whatever mesh the checkpoint was written from.
    """
    if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
        return None
    mgr = checkpoint_manager(stage_dir, create=False, partial=True)
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = mgr.item_metadata(step)["state"]
    keys = ["ema_params"] + (["model_state"] if with_state and stored.get("model_state") else [])
    target = {k: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored[k],
        is_leaf=lambda m: hasattr(m, "shape")) for k in keys}
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True),
        config=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    mgr.close()
    ema, cfg, meta = restored["state"]["ema_params"], restored["config"], restored["meta"]
    if with_state:
        return ema, restored["state"].get("model_state", {}), cfg, meta
    return ema, cfg, meta


# ----------------------------------------------------------------------------- Loop


def data_mesh() -> jax.sharding.Mesh:
    # Auto axes: XLA propagates the batch sharding; parameters stay replicated.
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> TrainState:
    """Trains c.stage into workdir/<stage>, resuming from its latest checkpoint.

    stop_at_step ends the run early with a checkpoint, as a preemption would.
    """
    # Input: validate everything before anything is written.
    configs.validate(c)
    stage_dir = os.path.join(workdir, c.stage)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise configs.ConfigError(f"{workdir} is a stage directory; pass its parent as --workdir")
    check_resumable(c, stage_dir)
    if c.data.batch_size % jax.device_count():
        raise configs.ConfigError(f"data.batch_size={c.data.batch_size} does not split over "
                                  f"{jax.device_count()} devices")
    task = TASKS[c.stage](c, workdir)

    # Model and optimizer, replicated over a 1-D data mesh.
    mesh = data_mesh()
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    init_key, train_key = jax.random.split(jax.random.key(c.seed))
    tx = make_optimizer(c.optim, c.train.steps)

    def init_state(key):
        params, model_state = task.init(key)
        return TrainState.create(apply_fn=None, params=params, tx=tx, ema_params=params,
                                 model_state=model_state)

    state = jax.jit(init_state, out_shardings=replicated)(init_key)
    step_fn = jax.jit(functools.partial(train_step, loss_fn=task.loss_fn,
                                        ema_decay=c.optim.ema_decay), donate_argnums=(0,))

    # Checkpoint: resume from the latest complete one.
    mgr = checkpoint_manager(stage_dir, c.train.keep_checkpoints)
    if mgr.latest_step() is not None:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    start = int(state.step)
    is_main = jax.process_index() == 0
    if start >= c.train.steps and stop_at_step is None:
        mgr.close()
        if is_main:
            print(f"{c.stage}: already trained ({start} steps) in {stage_dir}; nothing to do",
                  file=sys.stderr)
        return state
    end = min(c.train.steps, stop_at_step) if stop_at_step is not None else c.train.steps

    def save(state, finished: bool, **extra):
        variables = {"params": state.ema_params, **state.model_state}
        meta = dict(task.meta(variables), step=int(state.step), finished=finished, **extra)
        mgr.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(c.to_dict()),
            meta=ocp.args.JsonSave(meta)), force=True)

    # Loop.
    log_path = os.path.join(stage_dir, "metrics.jsonl")
    t0 = t_log = time.time()
    skipped, stopped_by = 0, None
    bar = tqdm(total=c.train.steps, initial=start, desc=c.stage, disable=not is_main,
               dynamic_ncols=True)
    step = start
    for step in range(start, end):
        batch = {k: jax.make_array_from_process_local_data(sharded, v)
                 for k, v in task.get_batch(step).items()}
        state, metrics = step_fn(state, batch, jax.random.fold_in(train_key, step))
        if not bool(metrics["finite"]):
            if not c.train.skip_nonfinite:
                mgr.wait_until_finished()
                raise TrainingError(
                    f"non-finite loss or gradient at step {step} ({c.stage}); stopped. "
                    f"Latest good checkpoint: step {mgr.latest_step()} in {stage_dir}")
            skipped += 1
        bar.update(1)
        if (step + 1) % c.train.log_every == 0 or step + 1 == end:
            now = time.time()
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row.update(step=step + 1, skipped_nonfinite=skipped, time=now - t0,
                       steps_per_sec=((step + 1 - max(start, step + 1 - c.train.log_every))
                                      / max(now - t_log, 1e-9)))
            t_log = now
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        over_budget = c.train.max_minutes and time.time() - t0 > 60 * c.train.max_minutes
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            over_budget = bool(multihost_utils.broadcast_one_to_all(np.bool_(over_budget)))
        if over_budget:
            stopped_by = "max_minutes"
            break
        if (step + 1) % c.train.ckpt_every == 0 and step + 1 < end:
            save(state, finished=False)
    bar.close()

    finished = stopped_by is not None or int(state.step) >= c.train.steps
    if mgr.latest_step() != int(state.step):
        save(state, finished=finished, stopped_by=stopped_by)
    mgr.wait_until_finished()
    mgr.close()
    if is_main and finished:
        print(f"{c.stage}: finished at step {int(state.step)} in {time.time() - t0:.0f}s "
              f"-> {stage_dir}", file=sys.stderr)
    return state


# ----------------------------------------------------------------------------- CLI


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("stage", None, f"What to train: {' | '.join(configs.STAGES)}.", flag_values=fv)
    flags.DEFINE_string("preset", "full", f"Config preset: {' | '.join(configs.PRESETS)}.",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "Run directory; this stage writes workdir/<stage>/.",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for multi-process runs (jax.distributed).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).",
                         flag_values=fv)


def init_distributed(fv) -> None:
    """jax.distributed from flags, or from the cluster's environment (TPU pods, Slurm)."""
    if fv.coordinator_address or fv.num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only
        jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> None:
    prog = "ldm_jax.train"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags, with_config=True)
    try:
        cli.require(fv, "stage", "workdir")
        config = cli.build_config(fv)
        cli.setup_jax()
        init_distributed(fv)
        train_and_evaluate(config, fv.workdir)
    except (cli.UsageError, configs.ConfigError, data.DataError) as e:
        cli.fail(prog, e)
    except TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
