"""Checkpoint I/O: the Orbax manager, what a checkpoint holds, resuming and loading.

A stage directory workdir/<stage>/ holds checkpoints/<step>/{state, config, meta}: the
whole TrainState (Orbax PyTree), the config it was trained with and a JSON `meta` (step,
whether training finished, and what the stage adds: latent statistics, the VAE step an
LDM was trained on, ...). Readers (sample, evaluate, benchmark, features) restore only
the EMA parameters, onto one device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys

import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from ldm_jax import configs, models

# Config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("preset", "train.steps", "train.max_minutes", "train.log_every",
                    "train.ckpt_every", "train.keep_checkpoints", "train.skip_nonfinite",
                    "sample.sampler", "sample.steps", "sample.eta", "sample.guide_weight",
                    "sample.time_power", "sample.gamma", "sample.guide_min_t", "sample.eta_min_t",
                    "model.dtype")

# What a stored config that lacks a field was trained with, where that differs from
# today's default (the recipe's defaults changed on 2026-11-26 from eps + uniform), or
# where it must stay so whatever the default becomes (no adversarial term before it existed).
LEGACY_VALUES = {"diffusion.prediction": "eps", "diffusion.loss_weighting": "uniform",
                 "diffusion.zero_terminal_snr": False, "loss.adversarial_weight": 0.0,
                 "model.text_conv": 0, "sample.guide_step": 0, "sample.guide_weight": 0.0,
                 "autoencoder.likelihood": "gaussian", "data.holdout": 0,
                 "sample.time_power": 1.0, "loss.l1_weight": 0.0, "model.decoder_res_blocks": -1,
                 "distill.low_noise_bias": 0.0, "sample.gamma": 1.0, "sample.guide_min_t": 0,
                 "distill.guide_min_t": 0, "distill.adversarial_weight": 0.0,
                 "sample.eta_min_t": 0}


def checkpoint_manager(stage_dir: str, keep: int = 3, create: bool = True,
                       partial: bool = False, preserve: tuple[int, ...] = ()) -> ocp.CheckpointManager:
    """Checkpoints of state (Orbax PyTree), config and meta (JSON) under stage_dir/checkpoints:
    the newest `keep`, and the steps in `preserve` for good (an autoguidance guide).

    partial=True opens them read-only for restoring a subtree (the EMA parameters)."""
    state = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    policy = ocp.checkpoint_managers.LatestN(keep)
    if preserve:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [policy, ocp.checkpoint_managers.CustomSteps(list(preserve))])
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(stage_dir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=create),
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


class CheckpointError(configs.ConfigError):
    """A checkpoint that cannot be used (damaged, or not what it should be); one line."""


class CheckpointDamaged(CheckpointError):
    """Integrity evidence against a checkpoint: files missing or garbled, no commit marker,
    or arrays that differ from their digests. Only these are ever moved aside."""


# Restore errors that are evidence of damaged files (tensorstore/Orbax wording); any other
# error (tree mismatch, out of memory, an Orbax change) leaves the checkpoint in place.
_DAMAGE_WORDS = ("DATA_LOSS", "NOT_FOUND", "No such file", "corrupt", "checksum", "crc",
                 "Error decoding", "truncated", "Unexpected end", "JSON",
                 "Expecting", "decompress", "Failed to decode", "OUT_OF_RANGE")
_RESOURCE_WORDS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def _restore_error(e: BaseException, where: str) -> CheckpointError:
    """The one-line error for an exception raised while Orbax restored a checkpoint: damage
    (CheckpointDamaged) only on evidence of damaged files, else a plain CheckpointError."""
    chain = []
    while e is not None and e not in chain:  # Orbax rewraps tensorstore's error
        chain.append(e)
        e = e.__cause__ or e.__context__
    words = " ".join(str(x) for x in chain)
    root = chain[-1]
    text = f"{type(root).__name__}: {str(root).splitlines()[0][:160] if str(root) else ''}"
    if any(isinstance(x, MemoryError) for x in chain) or any(w in words for w in _RESOURCE_WORDS):
        return CheckpointError(f"{where} could not be restored: out of memory ({text}); "
                               "it is intact as far as is known and was left in place")
    if any(isinstance(x, (FileNotFoundError, json.JSONDecodeError)) for x in chain) or \
            any(w in words for w in _DAMAGE_WORDS):
        return CheckpointDamaged(f"{where} is unreadable ({text})")
    return CheckpointError(f"{where} could not be restored ({text}); no sign of damage, so it "
                           "was left in place: check the Orbax version and the code it was "
                           "written with")


def step_dirs(stage_dir: str) -> list[int]:
    """Steps with a directory under stage_dir/checkpoints, complete or not, ascending."""
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _step_dir(stage_dir: str, step: int) -> str:
    return os.path.join(stage_dir, "checkpoints", str(step))


def _read_json_items(stage_dir: str, step: int) -> dict:
    """{'config': ..., 'meta': ...} of one checkpoint, after the cheap completeness checks
    (commit marker, Orbax metadata, state directory); CheckpointError otherwise."""
    d = _step_dir(stage_dir, step)
    where = f"checkpoint step {step} in {stage_dir}"
    if not os.path.isfile(os.path.join(d, "commit_success.txt")):
        raise CheckpointDamaged(f"{where} is incomplete (no commit_success.txt)")
    if not os.path.isdir(os.path.join(d, "state")):
        raise CheckpointDamaged(f"{where} has no state/ directory")
    out = {}
    for name, path in (("orbax", "_CHECKPOINT_METADATA"), ("config", "config/metadata"),
                       ("meta", "meta/metadata")):
        try:
            with open(os.path.join(d, path)) as fh:
                out[name] = json.load(fh)
        except (OSError, ValueError) as e:
            raise CheckpointDamaged(f"{where}: {path} is unreadable ({type(e).__name__})") from None
        if not isinstance(out[name], dict):
            raise CheckpointDamaged(f"{where}: {path} is not a JSON object")
    _check_step_name(stage_dir, step, out["meta"])
    return out


def _check_step_name(stage_dir: str, step: int, meta: dict) -> None:
    """The directory name must be the step its meta records (renamed or swapped directories
    would otherwise pass one step's weights off as another's)."""
    if "step" in meta and meta["step"] != step:
        raise CheckpointError(
            f"{_step_dir(stage_dir, step)} holds the checkpoint of step {meta['step']} "
            f"(its meta.step), not step {step}: step directories were renamed or swapped; "
            "give each its own step back before using or training this run")


def check_step_names(stage_dir: str) -> None:
    """_check_step_name for every step directory whose meta reads (damage is found later)."""
    for step in step_dirs(stage_dir):
        try:
            with open(os.path.join(_step_dir(stage_dir, step), "meta", "metadata")) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            _check_step_name(stage_dir, step, meta)


def _stored_json(stage_dir: str, item: str, step: int | None = None) -> dict | None:
    """One JSON item of a checkpoint; by default of the newest one that reads."""
    if step is not None:
        return _read_json_items(stage_dir, step)[item]
    for s in reversed(step_dirs(stage_dir)):
        try:
            return _read_json_items(stage_dir, s)[item]
        except CheckpointDamaged:
            continue
    return None


def stored_config(stage_dir: str, step: int | None = None) -> dict | None:
    """The config JSON of a checkpoint (default: the newest readable) in stage_dir, or None."""
    return _stored_json(stage_dir, "config", step)


def stored_meta(stage_dir: str, step: int | None = None) -> dict | None:
    """The meta JSON of a checkpoint (default: the newest readable) in stage_dir, or None."""
    return _stored_json(stage_dir, "meta", step)


# ----------------------------------------------------------------------------- Digests


def leaf_digests(tree) -> dict[str, str]:
    """{'a/b/c': SHA-256 (128 bits, hex) of that leaf's dtype, shape and raw bytes}. Paths
    are written the same for a TrainState and for the nested dicts a reader restores."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # replicated over processes: any copy will do
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = h.hexdigest()[:32]
    return out


def _combine(leaves: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key, value in sorted(leaves.items()):
        h.update(f"{key}={value}\n".encode())
    return h.hexdigest()


def tree_digest(tree) -> str:
    """One SHA-256 over a pytree's leaf digests: the identity of a set of weights."""
    return _combine(leaf_digests(tree))


def state_digests(state) -> dict:
    """What a checkpoint's meta stores: every leaf's digest and one over the whole tree."""
    leaves = leaf_digests(state)
    return dict(leaves=leaves, tree=_combine(leaves))


_UNVERIFIED_NOTED: set = set()


def verify(tree: dict, meta: dict, where: str, whole: bool = False) -> None:
    """Recomputes the digests of `tree` (a TrainState, or {'ema_params': ..., 'model_state':
    ...} as readers restore it) and compares them with those saved in `meta`; whole=True
    also requires the same set of leaves. Checkpoints written before digests existed pass
    with a one-line note."""
    saved = (meta.get("digests") or {}).get("leaves")
    if saved is None:
        if where not in _UNVERIFIED_NOTED:
            _UNVERIFIED_NOTED.add(where)
            print(f"note: {where} was written without digests and cannot be verified",
                  file=sys.stderr)
        return
    got = leaf_digests(tree)
    bad = sorted(k for k in got if saved.get(k) != got[k])
    if whole:
        bad += sorted(set(saved) - set(got))
    if bad:
        raise CheckpointDamaged(f"{where} is damaged: {len(bad)} array(s) differ from the "
                                f"digests saved with them (first: {bad[0]})")


def config_from_stored(stored: dict) -> ml_collections.ConfigDict:
    """A checkpoint's config dict as a ConfigDict, with fields added since it was written
    set to their defaults."""
    c = configs.get_config(stored["stage"], stored.get("preset", "full"))
    known = _flatten(c.to_dict())
    flat = {**{k: v for k, v in LEGACY_VALUES.items() if k in known}, **_flatten(stored)}
    c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                  for k, v in flat.items() if k in known})
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
    old_flat = {**_flatten(defaults), **{k: v for k, v in LEGACY_VALUES.items()
                                         if k in _flatten(defaults)}, **_flatten(old)}
    new_flat = _flatten(c.to_dict())
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if k not in RESUMABLE_FIELDS and old_flat.get(k) != new_flat.get(k))
    if diff:
        k = diff[0]
        raise configs.ConfigError(
            f"{stage_dir} was trained with {k}={old_flat.get(k)!r}, not {new_flat.get(k)!r} "
            f"({len(diff)} field(s) differ); use another workdir to train a new model, or set "
            f"{k}={old_flat.get(k)!r} to resume this one")


def _restore_readers_view(stage_dir: str, step: int, with_state: bool):
    """(ema_params, model_state, config, meta) of one checkpoint, verified against its
    digests; CheckpointError if it is incomplete, unreadable or damaged."""
    items = _read_json_items(stage_dir, step)
    where = f"checkpoint step {step} in {stage_dir}"
    try:
        mgr = checkpoint_manager(stage_dir, create=False, partial=True)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        # The whole state is read and checked (a damaged optimizer moment means a damaged
        # checkpoint), though only the EMA parameters and model state are returned.
        stored = mgr.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              dict(stored), is_leaf=lambda m: hasattr(m, "shape"))
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, ocp.checkpoint_utils.construct_restore_args(target))))
        mgr.close()
    except Exception as e:  # pylint: disable=broad-except
        raise _restore_error(e, where) from None
    state = restored["state"]
    verify(state, items["meta"], where, whole=True)
    model_state = (state.get("model_state") or {}) if with_state else {}
    return state["ema_params"], model_state, items["config"], items["meta"]


def newest_intact_step(stage_dir: str, below: int | None = None) -> int | None:
    """The newest step (below `below`) whose checkpoint reads and matches its digests."""
    for step in reversed(step_dirs(stage_dir)):
        if below is not None and step >= below:
            continue
        try:
            _restore_readers_view(stage_dir, step, with_state=True)
            return step
        except CheckpointError:
            continue
    return None


def load_checkpoint(stage_dir: str, step: int | None = None, with_state: bool = False):
    """(ema_params, config dict, meta) of a checkpoint (default: the newest), or None if
    stage_dir has none; with_state=True: (ema_params, model_state, config dict, meta).

    Restores only the EMA parameters (and the model state), onto this process's first
    device, whatever mesh the checkpoint was written from, and checks them against the
    digests saved with them. A damaged, incomplete or unreadable checkpoint raises
    CheckpointError, whose one line names the newest intact step and how to use it.
    """
    check_step_names(stage_dir)
    steps = step_dirs(stage_dir)
    if not steps:
        return None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{stage_dir} has no checkpoint step {step}; it has steps "
                              f"{', '.join(map(str, steps))}")
    try:
        ema, model_state, cfg, meta = _restore_readers_view(stage_dir, step, with_state)
    except CheckpointDamaged as e:
        intact = newest_intact_step(stage_dir, below=step)
        raise CheckpointDamaged(f"{e}; " + (f"the newest intact checkpoint is step {intact}: "
                                            f"pass --step={intact} to use it" if intact is not None
                                            else "no older checkpoint is intact")) from None
    if with_state:
        return ema, model_state, cfg, meta
    return ema, cfg, meta


def _tree_mismatch(stored, target) -> str | None:
    """The first difference between a checkpoint's stored state tree (Orbax metadata) and
    the state this run builds, as 'path: why', or None if paths, shapes and dtypes agree."""
    def leaves(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda m: hasattr(m, "shape"))[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(m.shape), str(m.dtype))
                for p, m in flat}
    have, want = leaves(dict(stored) if not hasattr(stored, "params") else stored), leaves(target)
    for key in sorted(set(have) | set(want)):
        if key not in have or key not in want:
            return f"{key}: {'not in this run' if key in have else 'not in the checkpoint'}"
        if have[key] != want[key]:
            return f"{key}: stored {have[key][0]} {have[key][1]}, this run {want[key][0]} {want[key][1]}"
    return None


def _restore_into(stage_dir: str, step: int, target):
    """(state, meta) of one checkpoint restored into `target` and verified; CheckpointDamaged
    on integrity evidence, CheckpointError for anything else (the checkpoint stays)."""
    where = f"checkpoint step {step} in {stage_dir}"
    items = _read_json_items(stage_dir, step)
    mgr = checkpoint_manager(stage_dir, create=False)
    try:
        try:
            stored = mgr.item_metadata(step)["state"]  # what readers parse (_sharding, _METADATA)
        except Exception as e:  # pylint: disable=broad-except
            raise _restore_error(e, where) from None
        mismatch = _tree_mismatch(stored, target)
        if mismatch:  # a config edited on disk, or changed code: the files are fine
            raise CheckpointError(
                f"{where} holds a state that does not fit this run's model ({mismatch}); it "
                "was left in place: resume with the config and code it was written with, or "
                "train in a new workdir")
        try:
            state = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # pylint: disable=broad-except
            raise _restore_error(e, where) from None
    finally:
        mgr.close()
    verify(state, items["meta"], where, whole=True)
    return state, items["meta"]


def _quarantine(stage_dir: str, step: int, error: CheckpointError) -> str:
    """Moves a damaged step directory to checkpoints/corrupt-<step>[.n] (never deletes it)."""
    base = os.path.join(stage_dir, "checkpoints", f"corrupt-{step}")
    aside, n = base, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{base}.{n}"
    os.replace(_step_dir(stage_dir, step), aside)
    print(f"{error}; moved it to {aside}", file=sys.stderr)
    return aside


def restore_for_training(stage_dir: str, target, quarantine: bool = True):
    """(state, meta) of the newest checkpoint that restores into `target` and matches its
    digests, or (None, None) if stage_dir has none. Each newer one with integrity evidence
    against it (CheckpointDamaged) is moved aside to checkpoints/corrupt-<step>/, with one
    line saying so; any other error is raised with every checkpoint left in place, and so
    is the case where none is intact (a run never restarts from 0 over checkpoints)."""
    check_step_names(stage_dir)
    steps = step_dirs(stage_dir)
    for step in reversed(steps):
        try:
            return _restore_into(stage_dir, step, target)
        except CheckpointDamaged as e:
            if quarantine and jax.process_index() == 0:
                _quarantine(stage_dir, step, e)
            _sync(f"quarantine-{step}")
    if steps:
        raise CheckpointError(
            f"no checkpoint in {stage_dir} is intact ({len(steps)} damaged" +
            (", moved to checkpoints/corrupt-*" if quarantine else "") +
            "); rerun to train from step 0, or restore them from a copy")
    return None, None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


# What flock raises on a filesystem that does not support it (some FUSE mounts, such as
# Google Drive's): stage_lock then falls back to an O_EXCL lock file.
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP)


def _busy(stage_dir: str, detail: str = "") -> configs.ConfigError:
    return configs.ConfigError(f"another trainer is running in {stage_dir}; wait for it "
                               f"or use another workdir{detail}")


@contextlib.contextmanager
def stage_lock(stage_dir: str):
    """One trainer per stage directory: an exclusive flock on stage_dir/.lock, held for
    the run (process 0 of a jax.distributed run holds it for all). The kernel drops it
    when the process dies, so a SIGKILLed run never blocks the next one. Where the
    filesystem refuses flock (NO_FLOCK), the lock is the file stage_dir/.lock.holder,
    made with O_EXCL (_holder_lock)."""
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(stage_dir, exist_ok=True)
    fd = os.open(os.path.join(stage_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise _busy(stage_dir) from None
            os.close(fd)
            fd = None
            with _holder_lock(stage_dir):
                yield
            return
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _holder_lock(stage_dir: str):
    """stage_lock without flock: stage_dir/.lock.holder, created with O_CREAT|O_EXCL and
    holding {"host", "pid"} as JSON, removed on release. A holder on this host whose pid
    is gone (a killed run) is stale and replaced, with one line on stderr; one on another
    host cannot be checked from here, so it is refused with the file to delete if that
    run is gone. (Two runs that both find one stale lock in the same instant may both
    take it: a crash followed by two simultaneous restarts.)"""
    path = os.path.join(stage_dir, ".lock.holder")
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):  # the second try after removing a stale lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pass
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
            host, pid = holder["host"], int(holder["pid"])
        except FileNotFoundError:
            continue  # released in between: try again
        except (OSError, ValueError, KeyError, TypeError):  # being written, or garbled
            raise _busy(stage_dir, f" (if no run is, delete {path})") from None
        if host != me["host"]:
            raise _busy(stage_dir, f" (held by pid {pid} on host {host}; if that run is "
                                   f"gone, delete {path})")
        if _pid_alive(pid):
            raise _busy(stage_dir)
        print(f"stage lock {path} was left by pid {pid}, which is no longer running; "
              "taking it over", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        raise _busy(stage_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def load_vae(workdir: str, step: int | None = None, digest: str | None = None):
    """(model, variables, config dict, meta) of the finished VAE in workdir/vae at `step`
    (default: its latest); variables is {'params': EMA parameters, **model state (the VQ
    codebook)}, without the adversarial loss's discriminator (the whole checkpoint is
    verified first). An LDM passes the VAE step and weight digest it was trained on (its
    meta's vae_step, vae_digest); a VAE with other weights is refused."""
    vae_dir = os.path.join(workdir, "vae")
    if step is not None and step not in step_dirs(vae_dir):
        raise configs.ConfigError(f"{vae_dir} no longer holds step {step}, the VAE this model "
                                  "was trained on; retrain the model in a new workdir")
    try:
        restored = load_checkpoint(vae_dir, step, with_state=True)
    except CheckpointDamaged as e:
        if step is None:
            raise
        raise CheckpointError(f"the VAE this model was trained on is damaged: "
                              f"{str(e).split('; ')[0]}; retrain both in a new workdir") from None
    if restored is None:
        raise configs.ConfigError(f"no trained VAE in {vae_dir}; run "
                                  f"`python -m ldm_jax.train --stage=vae --workdir={workdir}` first")
    params, model_state, cfg, meta = restored
    if cfg["stage"] != "vae":
        raise configs.ConfigError(f"{vae_dir} holds a {cfg['stage']!r} checkpoint, not a VAE")
    if not meta.get("finished"):
        raise configs.ConfigError(f"the VAE in {vae_dir} stopped at step {meta['step']} of "
                                  f"{cfg['train']['steps']}; rerun --stage=vae to finish it")
    params = models.split_discriminator(params)[0]
    # Decision: the EMA encoder/decoder go with the live VQ codebook, which is
    # itself an EMA of encoder outputs; there is no separate EMA codebook to pair them with.
    variables = {"params": params, **model_state}
    if digest is not None and tree_digest(variables) != digest:
        raise CheckpointError(f"{vae_dir} step {meta['step']} is not the VAE the LDM in "
                              f"{workdir}/ldm was trained on (weight digest differs); put that "
                              "VAE back, or retrain the LDM in a new workdir")
    return models.build_vae(cfg), variables, cfg, meta


def check_teacher(workdir: str, student: str, bound: dict) -> int:
    """The step of the teacher checkpoint a student (its stored meta `bound`) was distilled
    from, if workdir's teacher is still exactly that checkpoint (read without its arrays;
    loading it checks them against the same digests): a teacher trained further, or
    replaced, refuses its old student in one line."""
    teacher = configs.STUDENTS[student]
    teacher_dir = os.path.join(workdir, teacher)
    steps = step_dirs(teacher_dir)
    newest = steps[-1] if steps else None
    if newest != bound["teacher_step"]:
        raise configs.ConfigError(
            f"the {teacher} model in {teacher_dir} is "
            + (f"now at step {newest}" if newest is not None else "gone")
            + f", but the student in {workdir}/{student} was distilled from its step "
            f"{bound['teacher_step']}; distil again in a new workdir")
    if (stored_meta(teacher_dir) or {}).get("digests", {}).get("tree") != bound["teacher_digest"]:
        raise configs.ConfigError(
            f"{teacher_dir} step {newest} is not the {teacher} model the student in "
            f"{workdir}/{student} was distilled from (weight digest differs); distil again "
            "in a new workdir")
    return newest


def load_teacher(workdir: str, student: str, bound: dict | None = None):
    """(ema_params, config dict, meta) of the newest checkpoint of the model a student
    stage distils (configs.STUDENTS); with the student's stored meta `bound`, only the
    checkpoint it was distilled from (see check_teacher)."""
    check_step_names(os.path.join(workdir, configs.STUDENTS[student]))
    if bound is not None:
        check_teacher(workdir, student, bound)
    return load_stage(workdir, configs.STUDENTS[student])


def load_stage(workdir: str, stage: str, step: int | None = None):
    """(EMA params, config dict, meta) of workdir/<stage> at `step` (default: the newest);
    one line if there is none or it holds another stage."""
    stage_dir = os.path.join(workdir, stage)
    restored = load_checkpoint(stage_dir, step)
    if restored is None:
        raise configs.ConfigError(f"no trained {stage} model in {stage_dir}; run "
                                  f"`python -m ldm_jax.train --stage={stage} --workdir={workdir}`")
    if restored[1].get("stage") != stage:
        raise configs.ConfigError(f"{stage_dir} holds a {restored[1].get('stage')!r} checkpoint")
    return restored


def teacher_guide(workdir: str, teacher_cfg: dict, teacher_step: int):
    """The EMA parameters of the teacher's autoguidance guide, if its default sampler uses
    one (sample.guide_weight > 0) and the checkpoint is kept; else None."""
    sample_cfg = teacher_cfg.get("sample", {})
    guide_step = sample_cfg.get("guide_step", 0)
    teacher_dir = os.path.join(workdir, teacher_cfg["stage"])
    if (sample_cfg.get("guide_weight", 0.0) > 0 and 0 < guide_step < teacher_step
            and guide_step in step_dirs(teacher_dir)):
        return load_checkpoint(teacher_dir, guide_step)[0]
    return None
