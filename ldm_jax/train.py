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

import functools
import json
import os
import shutil
import sys
import time
from typing import Any

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

from ldm_jax import checkpoints, cli, configs, data, models, stages

Array = jax.Array
PyTree = Any

class TrainingError(RuntimeError):
    """Training had to stop (non-finite values); the message names the step."""


class TrainState(train_state.TrainState):
    ema_params: PyTree
    # Non-gradient model variables updated by the loss (the VQ codebook's 'vq' collection).
    model_state: PyTree = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- Update


def lr_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * final_lr_frac at total_steps
    (and flat after it)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
        end_value=optim.lr * optim.final_lr_frac)


def clip_by_part_norm(max_norm: float, separate: tuple[str, ...]) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied on its own to each top-level subtree named in
    `separate` (the VAE's discriminator) and to the rest, so one player's gradient never
    rescales the other's update. Without those keys it is clip_by_global_norm; its state
    is empty either way, so checkpoints do not change."""
    clip = optax.clip_by_global_norm(max_norm)

    def update_fn(updates, state, params=None):
        if not isinstance(updates, dict) or not any(k in updates for k in separate):
            return clip.update(updates, state)
        rest = {k: v for k, v in updates.items() if k not in separate}
        out = dict(clip.update(rest, state)[0])
        for k in separate:
            if k in updates:
                out[k] = clip.update(updates[k], state)[0]
        return out, state
    return optax.GradientTransformation(clip.init, update_fn)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `lr_schedule(optim, total_steps)`, after global-norm clipping (separately for
    a discriminator's parameters)."""
    clip = (clip_by_part_norm(optim.grad_clip, (models.DISCRIMINATOR,)) if optim.grad_clip > 0
            else optax.identity())
    return optax.chain(clip, optax.adamw(lr_schedule(optim, total_steps), optim.b1, optim.b2,
                                         weight_decay=optim.weight_decay))


def ema_decay_at(step: Array, decay: float) -> Array:
    """Warmed-up EMA decay min(decay, (1 + s) / (10 + s)), so short runs are not noise."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict, key: Array, *, loss_fn: stages.LossFn,
               ema_decay: float) -> tuple[TrainState, dict]:
    """One optimizer step. A non-finite loss or gradient leaves the parameters untouched
    (the step counter still advances) and reports finite=False."""
    batch = dict(batch, step=state.step)  # for losses that change over training
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


# ----------------------------------------------------------------------------- Loop


def is_finished(c: ml_collections.ConfigDict, step: int, train_seconds: float) -> bool:
    """A run is finished at train.steps, or once its cumulative training time (over every
    resume) reaches train.max_minutes: a budget stop is final for that budget."""
    budget = c.train.max_minutes
    return step >= c.train.steps or bool(budget and train_seconds >= 60 * budget)


def will_train(c: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether workdir's c.stage is unfinished (or absent), so training it takes steps."""
    newest = checkpoints.stored_meta(os.path.join(workdir, c.stage)) or {}
    return not is_finished(c, newest.get("step", 0), newest.get("train_seconds", 0.0))


def check_no_dependents(c: ml_collections.ConfigDict, workdir: str) -> None:
    """A VAE that an LDM was trained on cannot be changed (or rotated away) in place."""
    if c.stage != "vae":
        return
    ldm = checkpoints.stored_meta(os.path.join(workdir, "ldm"))
    if ldm is not None:
        raise configs.ConfigError(
            f"{workdir}/vae is the first stage of the LDM in {workdir}/ldm (trained on its step "
            f"{ldm.get('vae_step')}) and cannot be trained further in place; train a new VAE "
            "and LDM in a new workdir")


def _log_step(line: str) -> int | None:
    """The step of one metrics.jsonl row, or None for a blank or partly written one (power
    lost mid-write: the row is redone on resume, so it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _truncate_log(path: str, last_step: int) -> None:
    """Drops rows logged after the checkpoint a run resumes from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if _log_step(line) is not None
                and _log_step(line) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def shard_rows(x: np.ndarray, sharding: NamedSharding) -> Array:
    """x [N, ...] split by rows over the sharding's devices, zero rows padded to a multiple
    of their count (never drawn: indices stay below N)."""
    pad = -len(x) % sharding.mesh.size
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def gather_rows(arrays: dict, indices: Array, mesh: jax.sharding.Mesh) -> dict:
    """{k: arrays[k][indices]} for arrays split by rows over the mesh's 'data' axis
    (`shard_rows`) and indices [B] that every device holds: each device gathers the rows
    it has (zeros for the rest), and a reduce-scatter sums them into its own slice of the
    batch, which ends up sharded as a batch built on the host. Exact (one device adds each
    row, the others add zero), and only B rows cross devices, never the dataset."""
    def local(shard, idx):
        def one(x):
            rel = idx - jax.lax.axis_index("data") * x.shape[0]
            mine = ((rel >= 0) & (rel < x.shape[0])).reshape((-1,) + (1,) * (x.ndim - 1))
            rows = jnp.where(mine, x[jnp.clip(rel, 0, x.shape[0] - 1)], 0)
            return jax.lax.psum_scatter(rows, "data", scatter_dimension=0, tiled=True)
        return jax.tree.map(one, shard)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()),
                         out_specs=P("data"))(arrays, indices)


def _device_data_step(state, tally, arrays, train_key, *, mesh, num_examples, batch_size,
                      seed, **kwargs):
    """_tally_step on the batch of step state.step, drawn inside the step from the
    dataset on the devices (the accelerator path): nothing travels from the host."""
    indices = data.batch_indices_in_jit(num_examples, batch_size, seed, state.step)
    return _tally_step(state, tally, gather_rows(arrays, indices, mesh),
                       jax.random.fold_in(train_key, state.step), **kwargs)


def _tally_step(state, tally, batch, key, *, loss_fn, ema_decay):
    """train_step, plus on-device sums of the metrics over the log interval (finite steps
    only), the count of non-finite steps and the first bad step: nothing leaves the device
    until a log or checkpoint boundary reads the tally."""
    step = state.step
    state, metrics = train_step(state, batch, key, loss_fn=loss_fn, ema_decay=ema_decay)
    finite = metrics.pop("finite")
    sums = jax.tree.map(lambda s, m: s + jnp.where(finite, m.astype(jnp.float32), 0.0),
                        tally["sums"], metrics)
    return state, dict(sums=sums, count=tally["count"] + finite.astype(jnp.int32),
                       nonfinite=tally["nonfinite"] + (~finite).astype(jnp.int32),
                       first_bad=jnp.where((tally["first_bad"] < 0) & ~finite, step,
                                           tally["first_bad"]))


def _empty_tally(metric_shapes: dict, nonfinite: int = 0, first_bad: int = -1) -> dict:
    return dict(sums={k: jnp.zeros((), jnp.float32) for k in metric_shapes if k != "finite"},
                count=jnp.int32(0), nonfinite=jnp.int32(nonfinite),
                first_bad=jnp.int32(first_bad))


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: the loop stopped between steps; the message names the latest checkpoint."""


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> TrainState:
    """Trains c.stage into workdir/<stage>, resuming from its latest checkpoint.

    A resumed run keeps the learning-rate schedule of its first run (a larger train.steps
    trains on at its final LR), its cumulative time budget and its non-finite count, and
    ends where an uninterrupted run ends. stop_at_step ends early with a checkpoint, as a
    preemption would.
    """
    # Input: validate everything before anything is written.
    configs.validate(c)
    stage_dir = os.path.join(workdir, c.stage)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise configs.ConfigError(f"{workdir} is a stage directory; pass its parent as --workdir")
    checkpoints.check_step_names(stage_dir)  # renamed or swapped step directories
    checkpoints.check_resumable(c, stage_dir)
    if jax.process_count() > 1 and c.data.batch_size % jax.device_count():
        raise configs.ConfigError(f"data.batch_size={c.data.batch_size} does not split over "
                                  f"{jax.device_count()} devices")
    if stop_at_step is not None or will_train(c, workdir):
        check_no_dependents(c, workdir)
    task = stages.TASKS[c.stage](c, workdir)
    check_enough_data(c, task)  # before the lock or any directory is made
    with checkpoints.stage_lock(stage_dir):  # one trainer per stage directory
        remove_orbax_leftovers(stage_dir)
        try:
            return _run(c, workdir, task, stop_at_step)
        except Exception as e:  # pylint: disable=broad-except
            if not cli.is_no_space(e):
                raise
            remove_orbax_leftovers(stage_dir)
            raise TrainingError(no_space_message(stage_dir)) from None


def check_enough_data(c: ml_collections.ConfigDict, task: stages.Task) -> None:
    """A training set smaller than one batch cannot train; say so before writing anything."""
    n = len(next(iter(task.arrays.values()))) if task.arrays else None
    if n is not None and n < c.data.batch_size:
        raise data.DataError(f"the training set has {n} examples, fewer than one batch "
                             f"(data.batch_size={c.data.batch_size}); give more data or a "
                             "smaller --config.data.batch_size")


def remove_orbax_leftovers(stage_dir: str) -> None:
    """Deletes the temporary directories of checkpoint writes that never finished (a killed
    or disk-full run): only this trainer writes here (stage_lock), and Orbax would log an
    absl WARNING for each."""
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    if jax.process_index() != 0 or not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if ".orbax-checkpoint-tmp" in name:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def no_space_message(stage_dir: str) -> str:
    """One line for a disk-full stop: what was saved last, and how to go on."""
    steps = [s for s in checkpoints.step_dirs(stage_dir) if os.path.isfile(
        os.path.join(stage_dir, "checkpoints", str(s), "commit_success.txt"))]
    return (f"no space left on device while saving in {stage_dir}; " +
            (f"the last complete checkpoint is step {steps[-1]}" if steps else
             "no checkpoint was saved") + "; free some space and rerun the same command")


def _schedule_steps(c: ml_collections.ConfigDict, stage_dir: str) -> int:
    """The LR schedule's length, fixed by the first run (stored in every checkpoint)."""
    stored = checkpoints.stored_meta(stage_dir) or {}
    return stored.get("schedule_steps") or (
        (checkpoints.stored_config(stage_dir) or {}).get("train", {}).get("steps", c.train.steps))


def _init_or_restore(task: stages.Task, tx: optax.GradientTransformation, stage_dir: str,
                     init_key: Array, replicated: NamedSharding) -> tuple[TrainState, dict]:
    """The newest intact checkpoint's state and meta (damaged newer ones are moved aside),
    or a new state at step 0. A run keeps the shuffle of its first run (runs begun before
    the jax shuffle: numpy)."""
    def init_state(key):
        params, model_state = task.init(key)
        return TrainState.create(apply_fn=None, params=params, tx=tx, ema_params=params,
                                 model_state=model_state)

    state = jax.jit(init_state, out_shardings=replicated)(init_key)
    restored, resumed = checkpoints.restore_for_training(
        stage_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    start = dict(step=0, train_seconds=0.0, skipped_nonfinite=0)
    if restored is None:
        return state, {**start, "shuffle": data.SHUFFLES[0]}
    return restored, {**start, "shuffle": "numpy", **(resumed or {})}


def _step_runner(c: ml_collections.ConfigDict, task: stages.Task, mesh: jax.sharding.Mesh,
                 shuffle: str, train_key: Array):
    """(state, tally, step) -> (state, tally): one jitted _tally_step on the step's batch.

    On an accelerator the training set (images, or the LDM's encoded latents: 60,000 x
    7x7x4 floats is 47 MB) is split over the devices once, and each step draws its batch
    inside the jitted step. On the CPU the host is the device: batches are sliced in
    numpy, which measured faster there (VAE cpu-quick: see docs/results.md)."""
    get_batch = stages.batcher(c, task.arrays, shuffle)
    sharded = NamedSharding(mesh, P("data"))
    device_data = bool(task.arrays) and shuffle == "jax" and os.environ.get(
        "LDM_JAX_DEVICE_DATA", "auto" if jax.default_backend() != "cpu" else "0") != "0"
    kwargs = dict(loss_fn=task.loss_fn, ema_decay=c.optim.ema_decay)
    if device_data:
        arrays = {k: shard_rows(v, sharded) for k, v in task.arrays.items()}
        step_fn = jax.jit(functools.partial(
            _device_data_step, mesh=mesh, num_examples=len(next(iter(task.arrays.values()))),
            batch_size=c.data.batch_size, seed=c.seed, **kwargs), donate_argnums=(0, 1))
        return lambda state, tally, step: step_fn(state, tally, arrays, train_key)
    step_fn = jax.jit(functools.partial(_tally_step, **kwargs), donate_argnums=(0, 1))

    def host_data_step(state, tally, step):
        batch = {k: jax.make_array_from_process_local_data(sharded, v)
                 for k, v in get_batch(step).items()}
        return step_fn(state, tally, batch, jax.random.fold_in(train_key, step))
    return host_data_step


def _over_budget(c: ml_collections.ConfigDict, train_seconds: float) -> bool:
    """Whether the cumulative training time reached train.max_minutes, as process 0 saw
    it: every process must stop at the same step."""
    over = bool(c.train.max_minutes) and train_seconds >= 60 * c.train.max_minutes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        over = bool(multihost_utils.broadcast_one_to_all(np.bool_(over)))
    return over


def _run(c: ml_collections.ConfigDict, workdir: str, task: stages.Task,
         stop_at_step: int | None) -> TrainState:
    """Builds the train state, restores it, then steps, logs and saves to the end."""
    stage_dir = os.path.join(workdir, c.stage)
    schedule_steps = _schedule_steps(c, stage_dir)
    # Model and optimizer, replicated over a 1-D data mesh.
    mesh = cli.data_mesh(c.data.batch_size)
    replicated = NamedSharding(mesh, P())
    init_key, train_key = jax.random.split(jax.random.key(c.seed))
    # Every input of the step is committed to the mesh, so the step compiles once: an
    # uncommitted key or tally on the first call would compile it a second time when the
    # committed outputs come back in (a second ~13 s compilation of the smoke step here).
    # (jit rather than device_put: it places values on every process's devices alike.)
    commit = jax.jit(lambda x: x, out_shardings=replicated)
    train_key = commit(train_key)
    state, resumed = _init_or_restore(task, make_optimizer(c.optim, schedule_steps), stage_dir,
                                      init_key, replicated)
    run_step = _step_runner(c, task, mesh, resumed["shuffle"], train_key)
    # An autoguidance guide (sample.guide_step) is saved when reached and kept for good.
    guide_step = c.sample.guide_step if c.stage in configs.DIFFUSION_STAGES else 0
    mgr = checkpoints.checkpoint_manager(stage_dir, c.train.keep_checkpoints,
                                         preserve=(guide_step,) if guide_step else ())
    start = resumed["step"]
    if stop_at_step is None and is_finished(c, start, resumed["train_seconds"]):
        mgr.close()
        if jax.process_index() == 0:
            print(f"{c.stage}: already trained ({start} steps"
                  f"{', stopped by its time budget' if start < c.train.steps else ''}) in "
                  f"{stage_dir}; nothing to do", file=sys.stderr)
        return state
    end = min(c.train.steps, stop_at_step) if stop_at_step is not None else c.train.steps
    if jax.process_index() == 0 and schedule_steps != c.train.steps and start < end:
        print(f"{c.stage}: keeps the learning-rate schedule of its first run ({schedule_steps} "
              f"steps); past it the LR stays at {c.optim.lr * c.optim.final_lr_frac:.3g}",
              file=sys.stderr)
    loop = _Loop(c, task, stage_dir, mgr, mesh, resumed, schedule_steps, guide_step,
                 state, train_key, commit)
    return loop.run(state, run_step, end)


class _Loop:
    """The loop of one stage from its resumed step: step, log, maybe save, finish. The host
    reads the device only at log and checkpoint boundaries. A resumed run carries on its
    time (`spent`) and its count of skipped non-finite steps."""

    def __init__(self, c, task, stage_dir, mgr, mesh, resumed, schedule_steps, guide_step,
                 state: TrainState, train_key: Array, commit):
        self.c, self.task, self.stage_dir, self.mgr, self.mesh = c, task, stage_dir, mgr, mesh
        self.schedule_steps, self.guide_step = schedule_steps, guide_step
        self.shuffle, self.start = resumed["shuffle"], resumed["step"]
        self.spent, self.skipped_before = resumed["train_seconds"], resumed["skipped_nonfinite"]
        self.is_main = jax.process_index() == 0
        self.log_path = os.path.join(stage_dir, "metrics.jsonl")
        self.lr_at = lr_schedule(c.optim, schedule_steps)
        if self.is_main:
            _truncate_log(self.log_path, self.start)
        metric_shapes = jax.eval_shape(functools.partial(
            train_step, loss_fn=task.loss_fn, ema_decay=c.optim.ema_decay),
            state, task.get_batch(self.start), train_key)[1]
        # The metrics of a log interval, summed on the device (_tally_step).
        self.new_tally = lambda *a: commit(_empty_tally(metric_shapes, *a))
        self.t0 = self.t_log = time.time()
        self.step_log = self.start
        self.bar = tqdm(total=c.train.steps, initial=self.start, desc=c.stage,
                        disable=not self.is_main, dynamic_ncols=True)

    def run(self, state: TrainState, run_step, end: int) -> TrainState:
        """Steps from self.start to end, or until the time budget runs out."""
        c, tally, stopped_by = self.c, self.new_tally(self.skipped_before), None
        try:
            for step in range(self.start, end):
                state, tally = run_step(state, tally, step)
                self.bar.update(1)
                last = step + 1 == end
                if (step + 1) % c.train.log_every == 0 or last:
                    tally = self.log(tally, step)
                if _over_budget(c, self.train_seconds()):
                    stopped_by = "max_minutes"
                    break
                if ((step + 1) % c.train.ckpt_every == 0 or step + 1 == self.guide_step) \
                        and not last:
                    self.save(state, False, self.train_seconds(), self.check_finite(tally))
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (cli.sigterm_as_interrupt)
            raise self.interrupted(e) from None
        self.bar.close()
        return self.finish(state, tally, stopped_by)

    def train_seconds(self) -> float:
        """Training time over every run of this stage so far."""
        return self.spent + time.time() - self.t0

    def check_finite(self, tally: dict) -> int:
        """The count of non-finite steps so far; stops the run at a new one unless
        train.skip_nonfinite."""
        nonfinite, first_bad = (int(x) for x in jax.device_get(
            (tally["nonfinite"], tally["first_bad"])))
        if nonfinite > self.skipped_before and not self.c.train.skip_nonfinite:
            self.mgr.wait_until_finished()
            latest = self.mgr.latest_step()
            self.bar.close()
            raise TrainingError(
                f"non-finite loss or gradient at step {first_bad} ({self.c.stage}); stopped. " +
                (f"Latest good checkpoint: step {latest} in {self.stage_dir}"
                 if latest is not None else "No checkpoint was written before it"))
        return nonfinite

    def log(self, tally: dict, step: int) -> dict:
        """Appends the interval's mean metrics after step `step` to metrics.jsonl; returns
        a new tally that keeps the non-finite count."""
        nonfinite = self.check_finite(tally)
        host = jax.device_get(tally)
        now = time.time()
        n = max(int(host["count"]), 1)
        row = {k: float(v) / n for k, v in host["sums"].items()}
        # A skipped step leaves Adam's count, so the schedule counts applied updates; the
        # logged lr is the one applied at this step.
        row.update(step=step + 1, lr=float(self.lr_at(max(step - nonfinite, 0))),
                   skipped_nonfinite=nonfinite,
                   time=self.spent + now - self.t0,
                   steps_per_sec=(step + 1 - self.step_log) / max(now - self.t_log, 1e-9))
        self.t_log, self.step_log = now, step + 1
        tally = self.new_tally(nonfinite, int(host["first_bad"]))
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return tally

    def save(self, state: TrainState, finished: bool, train_seconds: float, nonfinite: int,
             **extra) -> None:
        """A checkpoint of the state, with the config and the meta a resume reads."""
        variables = {"params": state.ema_params, **state.model_state}
        meta = dict(self.task.meta(variables), step=int(state.step), finished=finished,
                    train_seconds=train_seconds, schedule_steps=self.schedule_steps,
                    skipped_nonfinite=nonfinite, digests=checkpoints.state_digests(state),
                    shuffle=self.shuffle, devices=self.mesh.size, **extra)
        self.mgr.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.c.to_dict()),
            meta=ocp.args.JsonSave(meta)), force=True)

    def interrupted(self, e: KeyboardInterrupt) -> TrainingInterrupted:
        """The error for Ctrl-C, after the checkpoint being written is complete."""
        self.bar.close()
        self.mgr.wait_until_finished()
        latest = self.mgr.latest_step()
        self.mgr.close()
        stop = TrainingInterrupted(
            f"interrupted; the latest complete checkpoint is step {latest} in "
            f"{self.stage_dir}; rerun the same command to resume" if latest is not None else
            "interrupted before the first checkpoint; nothing was saved")
        stop.status = cli.interrupted_status(e)
        return stop

    def finish(self, state: TrainState, tally: dict, stopped_by: str | None) -> TrainState:
        """Saves the last step (unless a checkpoint of it exists) and closes the manager."""
        nonfinite = self.check_finite(tally)
        train_seconds = self.train_seconds()
        finished = is_finished(self.c, int(state.step), train_seconds) or stopped_by is not None
        if self.mgr.latest_step() != int(state.step):
            self.save(state, finished, train_seconds, nonfinite, stopped_by=stopped_by)
        self.mgr.wait_until_finished()
        self.mgr.close()
        if self.is_main and finished:
            print(f"{self.c.stage}: finished at step {int(state.step)} in "
                  f"{time.time() - self.t0:.0f}s -> {self.stage_dir}", file=sys.stderr)
        return state


# ----------------------------------------------------------------------------- CLI


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("stage", None, f"What to train: {' | '.join(configs.STAGES)}.", flag_values=fv)
    flags.DEFINE_string("preset", "cpu-quick", f"Config preset: {' | '.join(configs.PRESETS)}.",
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
    with cli.sigterm_as_interrupt():  # SIGTERM: the one line Ctrl-C prints
        _main(argv)


def _main(argv: list[str] | None) -> None:
    prog = "ldm_jax.train"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags, with_config=True)
    try:
        cli.require(fv, "stage", "workdir")
        config = cli.build_config(fv)
        cli.check_workdir(fv.workdir)
        cli.setup_jax()
        init_distributed(fv)
        train_and_evaluate(config, fv.workdir)
    except (cli.UsageError, configs.ConfigError, data.DataError) as e:
        cli.fail(prog, e)
    except TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(1)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "status", None) or cli.interrupted_status(e))


if __name__ == "__main__":
    main()
