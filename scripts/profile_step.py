"""Where the time of one train step goes (issue 15): the `cpu-quick` LDM and pixel steps,
split into parts compiled alone, and the whole step with one component of the model
swapped out at a time.

    python scripts/profile_step.py [--stage=ldm|pixel|both] [--repeats=8] [--out=F.json]
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python scripts/profile_step.py --trace

--vs_nets=F: the whole step with the U-Net (and VAE) of another nets.py, e.g.
`git show dc65742:ldm_jax/nets.py > /tmp/nets_old.py`, timed interleaved with this one
in one process (A B A B ...), so a slow spell of a shared machine hits both alike.

--trace: a jax.profiler trace of three whole steps instead, with every XLA:CPU thunk's time
summed by what it computes: convolutions (forward, input gradient, weight gradient),
matmuls, reductions, transposes and copies, elementwise fusions.

Parts: the loss forward, forward + backward, the optimizer update, the EMA, the metric
norms, and the whole train_step. Ablations (each a different model, timed as a whole
step, so the difference to `step` is what that component costs): GroupNorm removed,
attention removed, nearest-neighbour upsampling by jnp.repeat instead of jax.image.resize.
Fresh parameters and random data: timing does not need a trained model. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import importlib.util
import json
import re
import statistics
import sys
import tempfile
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


def _computations(hlo: str) -> tuple[dict, dict]:
    """Optimised HLO text -> ({computation: [(name, opcode, line)]}, {name: (opcode, line)})."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("(")[0]:
            cur = comps.setdefault(head.group(1), [])
            continue
        inst = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
        if inst and cur is not None:
            cur.append((inst.group(1), inst.group(2), line))
    return comps, {n: (op, line) for ops in comps.values() for n, op, line in ops}


def _kind(name: str, comps: dict, insts: dict) -> str:
    """What one thunk computes, from the opcodes of the instructions it fuses."""
    op, line = insts[name]
    body = [(op, line)]
    for callee in re.findall(r"calls=%?([\w.\-]+)", line):
        body += [(o, l) for _, o, l in comps.get(callee, [])]
    ops = {o for o, _ in body}
    if "convolution" in ops:
        conv = next(l for o, l in body if o == "convolution")
        window = re.search(r"window=\{size=(\d+)x", conv)
        if window and int(window.group(1)) > 3:  # the window spans the activation
            return "conv weight-gradient"
        return "conv input-gradient" if "transpose(" in line else "conv forward"
    for kind in ("dot", "scatter", "gather", "reduce", "transpose", "copy"):
        if kind in ops:
            return kind
    return "elementwise"


def trace_breakdown(stage: str, steps: int = 3) -> dict:
    """Milliseconds per step of each kind of XLA:CPU thunk, from a jax.profiler trace (needs
    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true for per-thunk events)."""
    c, loss_fn, state, batch = setup(stage)
    step = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn,
                                     ema_decay=c.optim.ema_decay))
    args = (state, batch, jax.random.key(2))
    wall = _median_time(step, *args, repeats=steps)
    comps, insts = _computations(step.lower(*args).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    by_kind = collections.Counter()
    for e in events:
        if e["name"] in insts:
            by_kind[_kind(e["name"], comps, insts)] += e["dur"] / 1000 / steps
    if not by_kind:
        raise SystemExit("no per-thunk events: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
    return dict(step_ms=1000 * wall, thunk_ms=dict(by_kind.most_common()))


def vs_nets(stage: str, path: str, rounds: int) -> dict:
    """Median step seconds of this nets.py and of the one at `path`, interleaved."""
    spec = importlib.util.spec_from_file_location("nets_other", path)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # flax modules are dataclasses: they look themselves up
    spec.loader.exec_module(other)
    steps = {}
    for name, module in (("this", nets), ("other", other)):
        with _patched(models, "nets", module):
            c, loss_fn, state, batch = setup(stage)
        f = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn,
                                      ema_decay=c.optim.ema_decay))
        args = (state, batch, jax.random.key(2))
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
        steps[name] = (f, args)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (f, args) in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="both", choices=("ldm", "pixel", "both"))
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default="")
    p.add_argument("--trace", action="store_true", help="thunk times by kind (see above)")
    p.add_argument("--vs_nets", default="", help="another nets.py to time against (see above)")
    a = p.parse_args()
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    stages_ = ("ldm", "pixel") if a.stage == "both" else (a.stage,)
    if a.vs_nets:
        for stage in stages_:
            r = result[stage] = vs_nets(stage, a.vs_nets, a.repeats)
            print(f"{stage}: this {1000 * r['this']:.1f} ms, other {1000 * r['other']:.1f} ms, "
                  f"this/other {r['this'] / r['other']:.3f}", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    if a.trace:
        for stage in (("ldm", "pixel") if a.stage == "both" else (a.stage,)):
            r = result[stage] = trace_breakdown(stage)
            total = sum(r["thunk_ms"].values())
            print(f"{stage}: step {r['step_ms']:.0f} ms; thunks {total:.0f} ms", flush=True)
            for k, v in r["thunk_ms"].items():
                print(f"  {k:22s} {v:8.1f} ms  {100 * v / total:5.1f} %", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        return
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
