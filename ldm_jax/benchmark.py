"""Cost of one trained generator: train time per iteration, images/s, compile time, memory.

    python -m ldm_jax.benchmark --workdir=runs/demo --stage=ldm --what=train
    python -m ldm_jax.benchmark --workdir=runs/demo --stage=pixel --what=generate
    python -m ldm_jax.benchmark --workdir=runs/demo --stage=pixel --matched --what=train

--matched times the pixel model with the LDM's U-Net configuration (workdir/ldm's stored
config, fresh parameters, on 28x28x1 instead of the latent): beside the LDM's own row it
shows what the latent alone buys, whatever the pixel stage is configured as.

Prints one JSON object. `ldm_jax.evaluate` runs each (stage, what) in its own process so
the peak memory it reports belongs to that model alone. Timings are medians over repeated
calls after compilation (block_until_ready), compile time reported apart; peak memory is
the backend's `memory_stats()['peak_bytes_in_use']` where it has one, else the process's
max RSS (CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax import checkpoints, cli, configs, data, models, sample, stages, train

# Per preset: (train steps timed, generation batch, DDIM repeats, DDPM repeats).
PLAN = {"smoke": (3, 8, 1, 1), "cpu-quick": (20, 64, 3, 1), "full": (50, 256, 5, 2)}


def peak_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def _timed(fn, *args, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _stored_config(workdir: str, stage: str):
    restored = checkpoints.load_checkpoint(os.path.join(workdir, stage))
    if restored is None:
        raise configs.ConfigError(f"no trained {stage} model in {workdir}/{stage}")
    return checkpoints.config_from_stored(restored[1])


def matched_config(workdir: str):
    """The pixel stage with the LDM's U-Net, diffusion and optimizer configuration."""
    c = _stored_config(workdir, "ldm")
    c.stage = "pixel"
    return c


def matched_generator(workdir: str) -> sample.Generator:
    """The pixel model with the LDM's U-Net configuration and fresh parameters (speed does
    not depend on the weights), sampling 28x28x1 with the LDM's schedule."""
    c = matched_config(workdir)
    gen = sample.Generator(stage="pixel", unet=models.build_unet(c.model), params=None,
                           sched=models.build_schedule(c.diffusion), config=c.to_dict(),
                           shape=(28, 28, 1))
    y = [jnp.asarray(sample.null_conditions(gen, 1))] if c.model.conditioning != "none" else []
    params = gen.unet.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                           jnp.zeros((1,), jnp.int32), *y)["params"]
    return dataclasses.replace(gen, params=params)


class StepTimer:
    """The compiled train step of config c on fresh parameters, on the training loop's
    data mesh (parameters replicated, batch split over the devices), timed a few steps at
    a time (so two configs can be timed in turns on a noisy machine)."""

    def __init__(self, c, workdir: str):
        c = c.copy_and_resolve_references()
        c.data.max_examples = max(4 * c.data.batch_size, 1024)  # timing does not need all data
        self.task = task = stages.TASKS[c.stage](c, workdir)
        mesh = cli.data_mesh(c.data.batch_size)
        replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))
        params, model_state = task.init(jax.random.key(0))
        self.state = jax.device_put(train.TrainState.create(
            apply_fn=None, params=params, tx=train.make_optimizer(c.optim, c.train.steps),
            ema_params=jax.tree.map(jnp.copy, params), model_state=model_state), replicated)
        step = jax.jit(functools.partial(train.train_step, loss_fn=task.loss_fn,
                                         ema_decay=c.optim.ema_decay))
        self.key, self.i = jax.device_put(jax.random.key(1), replicated), 0
        self.devices = mesh.size
        t = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch(0), self.key).compile()
        self.compile_s = time.perf_counter() - t
        self.time(1)  # warm-up

    def batch(self, step: int) -> dict:
        return {k: jax.device_put(v, self.sharded) for k, v in self.task.get_batch(step).items()}

    def time(self, steps: int) -> list[float]:
        """Seconds of each of the next `steps` steps (batch on the host, as the CPU loop)."""
        times = []
        for _ in range(steps):
            b = self.batch(self.i)
            t = time.perf_counter()
            self.state, m = self.compiled(self.state, b, jax.random.fold_in(self.key, self.i))
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t)
            self.i += 1
        return times


def median_step_s_in_turns(timers: list[StepTimer], rounds: int = 4,
                           per_round: int = 5) -> list[float]:
    """Median seconds per step of each timer, timed in turns (rounds x per_round steps
    each), so a slow spell of a shared machine falls on all of them alike."""
    times = [[] for _ in timers]
    for _ in range(rounds):
        for t, timer in zip(times, timers):
            t += timer.time(per_round)
    return [float(np.median(t)) for t in times]


def bench_train(workdir: str, stage: str, steps: int, matched: bool = False) -> dict:
    """Median seconds per optimizer step of this stage's stored config (fresh parameters);
    matched: of the pixel model with the LDM's configuration."""
    c = matched_config(workdir) if matched else _stored_config(workdir, stage)
    timer = StepTimer(c, workdir)
    times = timer.time(steps)
    # What checkpoint integrity costs: the digests computed at every save and verified at
    # every load cover the whole TrainState (parameters, EMA, Adam moments).
    digest_s = _timed(checkpoints.state_digests, timer.state, repeats=3)
    state_mb = sum(x.nbytes for x in jax.tree.leaves(timer.state)) / 2**20
    return dict(stage=stage, matched=matched, what="train", batch_size=c.data.batch_size,
                devices=timer.devices,
                params=count_params(timer.state.params), train_compile_s=timer.compile_s,
                train_s_per_iter=float(np.median(times)), train_steps_timed=steps,
                state_mb=state_mb, digest_s=float(np.median(digest_s)), **peak_memory())


def bench_generate(workdir: str, stage: str, batch: int, ddim_repeats: int,
                   ddpm_repeats: int, matched: bool = False) -> dict:
    """Images/s of the full DDPM chain and of DDIM with 50 and 10 steps, at one batch size."""
    gen = matched_generator(workdir) if matched else sample.load_generator(workdir, stage)
    T = gen.sched.num_timesteps
    out = dict(stage=stage, matched=matched, what="generate", gen_batch=batch, params=count_params(gen.params),
               timesteps=T)
    for name, sampler, steps, repeats in (("ddim10", "ddim", min(10, T), ddim_repeats),
                                          ("ddim50", "ddim", min(50, T), ddim_repeats),
                                          ("ddpm", "ddpm", T, ddpm_repeats)):
        fn = sample.sample_fn(gen, batch, sampler, steps)
        args = fn.run_args(jax.random.key(0))
        t = time.perf_counter()
        compiled = fn.run.lower(*args).compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t
        times = _timed(compiled, *args, repeats=repeats)
        out[f"{name}_images_per_s"] = batch / float(np.median(times))
    out.update(peak_memory())
    return out


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Run directory holding workdir/<stage>.", flag_values=fv)
    flags.DEFINE_string("stage", None, "ldm | pixel.", flag_values=fv)
    flags.DEFINE_string("what", "train", "train | generate.", flag_values=fv)
    flags.DEFINE_string("preset", "cpu-quick", "How long to measure: smoke | cpu-quick | full.",
                        flag_values=fv)
    flags.DEFINE_bool("matched", False, "With --stage=pixel: the pixel model with the LDM's "
                      "U-Net configuration (needs workdir/ldm), untrained.", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    prog = "ldm_jax.benchmark"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags)
    try:
        cli.require(fv, "workdir", "stage")
        cli.check_workdir(fv.workdir, must_exist=True, writable=False)
        if fv.stage not in configs.DIFFUSION_STAGES:
            raise cli.UsageError(f"--stage must be ldm or pixel, got {fv.stage!r}")
        if fv.what not in ("train", "generate"):
            raise cli.UsageError(f"--what must be train or generate, got {fv.what!r}")
        if fv.matched and fv.stage != "pixel":
            raise cli.UsageError("--matched goes with --stage=pixel")
        if fv.preset not in PLAN:
            raise cli.UsageError(f"unknown preset {fv.preset!r}; choose one of {', '.join(PLAN)}")
        cli.setup_jax()
        steps, batch, ddim_rep, ddpm_rep = PLAN[fv.preset]
        if fv.what == "train":
            result = bench_train(fv.workdir, fv.stage, steps, fv.matched)
        else:
            result = bench_generate(fv.workdir, fv.stage, batch, ddim_rep, ddpm_rep, fv.matched)
    except (cli.UsageError, configs.ConfigError, data.DataError) as e:
        cli.fail(prog, e)
    result["device"] = jax.devices()[0].device_kind
    print(json.dumps(result))


if __name__ == "__main__":
    main()
