"""Where the time of one train step goes (issue 15): the `cpu-quick` LDM and pixel steps,
split into parts compiled alone, and the whole step with one component of the model
swapped out at a time.

    python scripts/profile_step.py [--stage=ldm|pixel|both] [--repeats=8] [--out=F.json]

Parts: the loss forward, forward + backward, the optimizer update, the EMA, the metric
norms, and the whole train_step. Ablations (each a different model, timed as a whole
step, so the difference to `step` is what that component costs): GroupNorm removed,
attention removed, nearest-neighbour upsampling by jnp.repeat instead of jax.image.resize.
Fresh parameters and random data: timing does not need a trained model. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax import configs, diffusion, models, nets, train


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def setup(stage: str):
    c = configs.get_config(stage, "cpu-quick")
    unet, sched = models.build_unet(c.model), models.build_schedule(c.diffusion)
    shape = (c.data.batch_size, 7, 7, 4) if stage == "ldm" else (c.data.batch_size, 28, 28, 1)
    x0 = jax.random.normal(jax.random.key(0), shape)

    def loss_fn(params, model_state, batch, key):
        net_fn = lambda x, t: unet.apply({"params": params}, x, t)
        loss = jnp.mean(diffusion.training_losses(
            net_fn, sched, batch["x"], key, prediction=c.diffusion.prediction,
            weighting=c.diffusion.loss_weighting, min_snr_gamma=c.diffusion.min_snr_gamma))
        return loss, ({}, model_state)

    params = unet.init(jax.random.key(1), x0[:1], jnp.zeros((1,), jnp.int32))["params"]
    tx = train.make_optimizer(c.optim, c.train.steps)
    state = train.TrainState.create(apply_fn=None, params=params, tx=tx,
                                    ema_params=jax.tree.map(jnp.copy, params))
    return c, loss_fn, state, {"x": x0}


def parts(stage: str, repeats: int) -> dict:
    c, loss_fn, state, batch = setup(stage)
    key = jax.random.key(2)
    grads = jax.grad(lambda p: loss_fn(p, {}, batch, key)[0])(state.params)
    out = {"params": sum(x.size for x in jax.tree.leaves(state.params))}
    out["forward"] = _median_time(jax.jit(lambda p: loss_fn(p, {}, batch, key)[0]),
                                  state.params, repeats=repeats)
    out["forward_backward"] = _median_time(
        jax.jit(jax.value_and_grad(lambda p: loss_fn(p, {}, batch, key)[0])), state.params,
        repeats=repeats)
    out["optimizer"] = _median_time(jax.jit(lambda s, g: s.apply_gradients(grads=g)), state,
                                    grads, repeats=repeats)
    out["ema"] = _median_time(jax.jit(lambda p, e: optax.incremental_update(p, e, 1e-3)),
                              state.params, state.ema_params, repeats=repeats)
    out["metric_norms"] = _median_time(
        jax.jit(lambda p, q: (optax.tree.norm(p),
                              optax.tree.norm(jax.tree.map(jnp.subtract, p, q)))),
        state.params, state.ema_params, repeats=repeats)
    out["step"] = _median_time(jax.jit(functools.partial(
        train.train_step, loss_fn=loss_fn, ema_decay=c.optim.ema_decay)), state, batch, key,
        repeats=repeats)
    return out


class _NoNorm(nn.Module):
    num_groups: int = 8

    @nn.compact
    def __call__(self, x):
        return x


def _no_attention(self, x, *args, **kwargs):
    return x


def _repeat_upsample(x, size):
    f = -(-size // x.shape[1])
    return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)[:, :size, :size]


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


ABLATIONS = {
    "no_groupnorm": lambda: _patched(nets.nn, "GroupNorm", _NoNorm),
    "no_attention": lambda: _patched(nets.AttnBlock, "__call__", _no_attention),
    "repeat_upsample": lambda: _patched(nets, "upsample_to", _repeat_upsample),
}


def ablations(stage: str, repeats: int) -> dict:
    out = {}
    for name, patch in ABLATIONS.items():
        with patch():
            c, loss_fn, state, batch = setup(stage)
            out[name] = _median_time(jax.jit(functools.partial(
                train.train_step, loss_fn=loss_fn, ema_decay=c.optim.ema_decay)), state, batch,
                jax.random.key(2), repeats=repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="both", choices=("ldm", "pixel", "both"))
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default="")
    a = p.parse_args()
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for stage in (("ldm", "pixel") if a.stage == "both" else (a.stage,)):
        r = parts(stage, a.repeats)
        r.update(ablations(stage, a.repeats))
        result[stage] = r
        print(f"{stage}: params {r['params']:,}", flush=True)
        for k, v in r.items():
            if k != "params":
                share = f"{100 * v / r['step']:5.1f} %" if k != "step" else ""
                print(f"  {k:18s} {1000 * v:9.1f} ms  {share}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
