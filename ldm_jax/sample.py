"""Sampling from a trained LDM or pixel model, with the EMA parameters.

    python -m ldm_jax.sample --workdir=runs/demo --stage=ldm --num=64 --out=grid.png
        [--sampler=ddpm|ddim|dpmpp2m] [--steps=K] [--eta=0.0] [--eta_min_t=M] [--seed=0] [--step=N]
        [--autoguidance=W]   # guided by the run's earlier checkpoint (sample.guide_step)
    python -m ldm_jax.sample --workdir=runs/cond --stage=ldm --label=7 --guidance=3.0 --out=7s.png
    python -m ldm_jax.sample --workdir=runs/text --stage=ldm --prompt="a handwritten seven" \
        --prompt="3" --guidance=3 --num=16 --out=prompts.png   # one grid row per prompt

Guidance convention: eps = (1 + w) * eps(z, c) - w * eps(z, null), so w = 0 is plain
conditional sampling (Ho & Salimans 2021); code using a scale s writes s = 1 + w.

Writes the PNG grid and, beside it, an .npz holding `images`, uint8 [N, 28, 28].
The LDM runs the whole reverse chain on latents and decodes once at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm.auto import tqdm

from ldm_jax import (checkpoints, cli, configs, consistency, data, diffusion, models, nets,
                     stages, text)

SAMPLERS = configs.SAMPLERS


@dataclasses.dataclass(frozen=True)
class Generator:
    """Everything needed to sample one trained diffusion stage."""
    stage: str
    unet: nets.UNet
    params: Any  # EMA parameters of the U-Net
    sched: diffusion.Schedule
    config: dict
    shape: tuple[int, int, int]  # one sample: latent (s, s, c) or pixels (28, 28, 1)
    vae: nets.VAE | None = None
    vae_vars: Any = None  # {'params': EMA parameters, **model state} of the first stage
    scale_factor: float = 1.0
    step: int = 0
    # SHA-256 of the weights that sample (U-Net EMA parameters, the VAE's for an LDM, and
    # the guide's): what a cache of samples or a set of saved samples is keyed on.
    identity: str = ""
    # Autoguidance: the EMA parameters of this run at sample.guide_step (None: not kept).
    guide_params: Any = None
    guide_step: int = 0
    guide_min_t: int = 0  # autoguidance only where t >= this (sample.guide_min_t; 0: every t)
    eta_min_t: int = 0  # DDIM's eta only at steps from t >= this (sample.eta_min_t; 0: every step)


def load_generator(workdir: str, stage: str, step: int | None = None) -> Generator:
    """Loads workdir/<stage> at `step` (default: the newest checkpoint) and, for the LDM,
    the VAE checkpoint it was trained on; every array is checked against its digest."""
    if stage in configs.STUDENTS:
        return load_student(workdir, stage, step)
    if stage not in configs.DIFFUSION_STAGES:
        raise configs.ConfigError(f"cannot sample stage {stage!r}; choose "
                                  f"{', '.join(configs.DIFFUSION_STAGES + tuple(configs.STUDENTS))}")
    stage_dir = os.path.join(workdir, stage)
    params, cfg, meta = checkpoints.load_stage(workdir, stage, step)
    sample_cfg = cfg.get("sample", {})
    guide_step = sample_cfg.get("guide_step", 0)
    guide = None
    # A guide must be an earlier (weaker) model: at or past it, check_autoguidance refuses.
    if guide_step and guide_step < meta["step"] and guide_step in checkpoints.step_dirs(stage_dir):
        guide = checkpoints.load_checkpoint(stage_dir, guide_step)[0]
    common = dict(stage=stage, unet=models.build_unet(cfg["model"]), params=params,
                  sched=models.build_schedule(cfg["diffusion"]), config=cfg, step=meta["step"],
                  guide_params=guide, guide_step=guide_step if guide is not None else 0,
                  **{k: sample_cfg.get(k, checkpoints.LEGACY_VALUES[f"sample.{k}"])
                     for k in ("guide_min_t", "eta_min_t")})
    weights = {"unet": params} if guide is None else {"unet": params, "guide": guide}
    if stage == "pixel":
        identity = checkpoints.tree_digest(params if guide is None else weights)
        return Generator(shape=(28, 28, 1), identity=identity, **common)
    vae, vae_vars, _, _ = checkpoints.load_vae(workdir, step=meta["vae_step"],
                                               digest=meta.get("vae_digest"))
    identity = checkpoints.tree_digest({**weights, "vae": vae_vars,
                                        "scale": np.float64(meta["scale_factor"])})
    return Generator(shape=tuple(meta["latent_shape"]), vae=vae, vae_vars=vae_vars,
                     scale_factor=meta["scale_factor"], identity=identity, **common)


def load_student(workdir: str, stage: str, step: int | None = None,
                 teacher: Generator | None = None) -> Generator:
    """A few-step student (configs.STUDENTS) at `step`, with its teacher's U-Net
    architecture, schedule and first stage; refused unless workdir's teacher is still the
    checkpoint it was distilled from (checkpoints.check_teacher). `teacher`: that teacher,
    already loaded (its step is checked), so it is not read again."""
    params, cfg, meta = checkpoints.load_stage(workdir, stage, step)
    params = models.split_discriminator(params)[0]
    teacher_step = checkpoints.check_teacher(workdir, stage, meta)
    if teacher is None or teacher.step != teacher_step:
        teacher = load_generator(workdir, configs.STUDENTS[stage], teacher_step)
    weights = {"unet": params} if teacher.vae is None else {
        "unet": params, "vae": teacher.vae_vars, "scale": np.float64(teacher.scale_factor)}
    config = dict(teacher.config, stage=stage, distill=cfg["distill"],
                  sample=dict(cfg["sample"], weight=default_student_weight(cfg, teacher.config)))
    unet = teacher.unet
    if configs.student_takes_weight(cfg["distill"]):
        unet = models.build_unet(teacher.config["model"], weight_input=True)
    return dataclasses.replace(teacher, stage=stage, unet=unet, params=params, config=config,
                               step=meta["step"], identity=checkpoints.tree_digest(weights),
                               guide_params=None, guide_step=0)


def default_student_weight(student_cfg: dict, teacher_cfg: dict) -> float:
    """The autoguidance weight a student that takes it samples at by default: its
    sample.weight, or (< 0) its teacher's own guide_weight, within the range it was
    distilled on; 0 for any other student."""
    d, conditioning = student_cfg["distill"], teacher_cfg["model"].get("conditioning", "none")
    if not configs.student_takes_weight(d) or conditioning != "none":
        return 0.0
    w = student_cfg["sample"].get("weight", -1.0)
    w = teacher_cfg["sample"].get("guide_weight", 0.0) if w < 0 else w
    return min(max(w, d["weight_min"]), d["weight_max"])


def is_student(gen: Generator) -> bool:
    return gen.stage in configs.STUDENTS


def student_weight_range(gen: Generator) -> tuple[float, float] | None:
    """[min, max] of the guidance weight a student takes as an input (CFG's for a class
    teacher, autoguidance's otherwise), or None: its guidance was fixed when distilled."""
    d = gen.config["distill"]
    return (d["weight_min"], d["weight_max"]) if configs.student_takes_weight(d) else None


def check_student_steps(gen: Generator, steps: int) -> None:
    """A student samples in 1 to distill.intervals steps."""
    intervals = gen.config["distill"]["intervals"]
    if not 1 <= steps <= intervals:
        raise configs.ConfigError(f"the {gen.stage} student samples in 1 to {intervals} steps "
                                  f"(distill.intervals), got --steps={steps}")


def check_autoguidance(gen: Generator, w: float) -> None:
    """w > 0 needs the guide checkpoint that training kept (sample.guide_step), and a
    sampled step past it: at the guide it is a no-op, before it guided by a better model."""
    step = gen.config.get("sample", {}).get("guide_step", 0)
    if w > 0 and step and gen.step <= step:
        raise configs.ConfigError(
            f"autoguidance guides by step {step} (sample.guide_step), and step {gen.step} is "
            f"{'that step' if gen.step == step else 'before it'}; sample a later step or "
            "pass --autoguidance=0")
    if w > 0 and gen.guide_params is None:
        raise configs.ConfigError(
            f"autoguidance needs an earlier checkpoint of this {gen.stage} run, and "
            + (f"step {step} (sample.guide_step) is no longer in its checkpoints" if step else
               "it was trained without sample.guide_step") + "; sample with --autoguidance=0")


def is_conditional(gen: Generator) -> bool:
    return gen.config["model"].get("conditioning", "none") != "none"


def is_text(gen: Generator) -> bool:
    return gen.config["model"].get("conditioning", "none") == "text"


def null_label(gen: Generator) -> int | np.ndarray:
    """The unconditional condition: the null label, or for text the empty prompt's tokens [L]."""
    if is_text(gen):
        return text.encode("")
    return int(gen.config["model"].get("num_classes", 10))


def null_conditions(gen: Generator, n: int) -> np.ndarray:
    """n copies of null_label(gen): int32 [n] labels, or [n, L] prompt tokens."""
    null = np.asarray(null_label(gen), np.int32)
    return np.broadcast_to(null, (n, *null.shape)).copy()


def sample_mesh(n: int) -> jax.sharding.Mesh | None:
    """The mesh a batch of n samples is split over (the parameters replicated): in one
    process, cli.data_mesh's devices (on a CPU one per core); None for one device, and in
    multi-process runs, which sample on one device."""
    mesh = cli.data_mesh(n) if jax.process_count() == 1 else None
    return mesh if mesh is not None and mesh.size > 1 else None


def _decode_fn(gen: Generator):
    """z -> images: the VAE's decoder for an LDM, the identity for a pixel model."""
    def decode(z):
        if gen.vae is None:
            return z
        return gen.vae.apply(gen.vae_vars, z / gen.scale_factor,
                             method=nets.VAE.decode)
    return decode


def _eps_of(gen: Generator):
    """params -> eps_fn: the network's output (eps, v or x0) becomes eps in one place;
    guidance and every sampler then work on eps."""
    prediction = models.prediction(gen.config["diffusion"])

    def eps_of(params):
        net_fn = models.unet_fn(gen.unet, gen.config["model"], params)
        return diffusion.eps_fn_from_model(net_fn, gen.sched, prediction)
    return eps_of


def _placement(n: int, keep_trajectory: bool):
    """(replicate, out_shardings): a batch of n samples is split over sample_mesh(n), the
    parameters and per-call inputs replicated; one device places nothing."""
    mesh = sample_mesh(n)
    if mesh is None:
        return (lambda tree: tree), None
    replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
    out = NamedSharding(mesh, P("data"))
    return replicate, (out, NamedSharding(mesh, P(None, "data"))) if keep_trajectory else out


def _reverse_chain(eps_fn, gen: Generator, key: jax.Array, shape: tuple, sampler: str,
                   steps: int, eta: float, clip: bool, keep_trajectory: bool):
    """x_0 [n, ...] from noise by the named sampler (and its chain, if asked)."""
    if sampler == "ddpm":
        return diffusion.ddpm_sample(eps_fn, gen.sched, key, shape,
                                     gen.config["diffusion"]["var_type"], clip, keep_trajectory)
    if sampler == "dpmpp2m":
        return diffusion.dpmpp2m_sample(eps_fn, gen.sched, key, shape, steps, clip,
                                        keep_trajectory)
    return diffusion.ddim_sample(eps_fn, gen.sched, key, shape, steps, eta, clip,
                                 keep_trajectory, gen.eta_min_t)


def _student_chain(gen: Generator, key: jax.Array, shape: tuple, steps: int, params, labels,
                   w):
    """x_0 [n, ...] from noise in `steps` student steps (consistency.sample); w, the
    guidance weight, is used by a student that takes it (student_weight_range)."""
    cfg = gen.config
    grid = consistency.student_grid(gen.sched.num_timesteps, cfg["distill"]["intervals"])
    tc = checkpoints.config_from_stored(dict(cfg, stage=configs.STUDENTS[gen.stage]))
    w = jnp.full((shape[0],), w, jnp.float32) if student_weight_range(gen) else None
    x0_fn = stages.student_x0_fn(gen.unet, tc, gen.sched, params,
                                 labels if is_conditional(gen) else None, w)
    power = cfg["sample"].get("time_power", checkpoints.LEGACY_VALUES["sample.time_power"])
    times = consistency.sampling_times(grid, steps, power)
    gamma = cfg["sample"].get("gamma", checkpoints.LEGACY_VALUES["sample.gamma"])
    x = consistency.sample(x0_fn, gen.sched, key, shape, times, gamma)
    return jnp.clip(x, -1, 1) if cfg["diffusion"]["clip_x0"] else x


def _chain_fn(gen: Generator, shape: tuple, sampler: str, steps: int, eta: float,
              keep_trajectory: bool, autoguidance: float):
    """(params, guide_params, key, labels, guidance) -> x_0 (and the chain, if asked)."""
    if is_student(gen):
        check_student_steps(gen, steps)
        if keep_trajectory:
            raise configs.ConfigError("a student keeps no trajectory")
        return lambda params, guide_params, key, labels, guidance: _student_chain(
            gen, key, shape, steps, params, labels,
            guidance if is_conditional(gen) else autoguidance)
    if sampler not in SAMPLERS:
        raise configs.ConfigError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    check_autoguidance(gen, autoguidance)
    clip = bool(gen.config["diffusion"]["clip_x0"])
    eps_of = _eps_of(gen)

    def chain(params, guide_params, key, labels, guidance):
        eps_fn = eps_of(params)
        if autoguidance > 0:
            eps_fn = diffusion.autoguided_eps_fn(eps_fn, eps_of(guide_params), autoguidance,
                                                 gen.guide_min_t)
        if is_conditional(gen):
            eps_fn = diffusion.guided_eps_fn(eps_fn, labels, null_label(gen), guidance)
        return _reverse_chain(eps_fn, gen, key, shape, sampler, steps, eta, clip,
                              keep_trajectory)
    return chain


def sample_fn(gen: Generator, n: int, sampler: str = "ddim", steps: int = 100,
              eta: float = 0.0, keep_trajectory: bool = False, autoguidance: float = 0.0):
    """A jitted (key, labels=None, guidance=0.0) -> images [n, 28, 28, 1] in [-1, 1]
    (and the chain, if asked).

    autoguidance w > 0 samples with eps = (1 + w) eps - w eps_guide, the guide being the
    run's kept earlier checkpoint (diffusion.autoguided_eps_fn), at t >= gen.guide_min_t;
    each guided step costs two U-Net calls.

    For a conditional model, labels [n] picks the digits, or for a text model tokens
    [n, L] (text.encode_batch) the prompts (None: the null label or empty prompt, i.e.
    unconditional) and guidance is w of eps = (1 + w) eps(z, c) - w eps(z, null); both are
    traced arguments, so changing them does not recompile. A student (configs.STUDENTS)
    samples in `steps` consistency steps; its guidance was fixed when it was distilled, unless
    it takes its weight (student_weight_range): then guidance, or autoguidance, is that weight.
    """
    chain = _chain_fn(gen, (n, *gen.shape), sampler, steps, eta, keep_trajectory, autoguidance)
    decode = _decode_fn(gen)
    replicate, out_shardings = _placement(n, keep_trajectory)
    params, guide_params = replicate((gen.params, gen.guide_params if autoguidance > 0 else None))

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def run(params, guide_params, key, labels, guidance):
        out = chain(params, guide_params, key, labels, guidance)
        x, traj = out if keep_trajectory else (out, None)
        return (jnp.clip(decode(x), -1, 1), traj) if keep_trajectory else jnp.clip(decode(x), -1, 1)

    def run_args(key, labels=None, guidance=0.0) -> tuple:
        """The arguments of `run` for one call (labels: int [n] for class models, prompt
        tokens [n, L] for text models)."""
        null = null_conditions(gen, n)
        labels = jnp.asarray(null if labels is None else labels, jnp.int32)
        if labels.shape != null.shape:
            raise ValueError(f"labels must have shape {null.shape}, got {labels.shape}")
        return (params, guide_params, *replicate((key, labels, jnp.float32(guidance))))

    def call(key, labels=None, guidance=0.0):
        return run(*run_args(key, labels, guidance))
    # The jitted function and its arguments, for ahead-of-time compilation in benchmarks.
    call.run, call.run_args = run, run_args
    return call


def generate(gen: Generator, num: int, key: jax.Array, sampler: str = "ddim", steps: int = 100,
             eta: float = 0.0, batch_size: int = 256, progress: bool = True,
             labels: np.ndarray | None = None, guidance: float = 0.0,
             prompts: list[str] | None = None, autoguidance: float = 0.0) -> np.ndarray:
    """num samples as uint8 [num, 28, 28], in fixed-size batches (one compilation).

    labels [num] (class-conditional models) or prompts, num strings (text-conditioned
    models; '' is the unconditional model); neither: unconditional. guidance is w of
    classifier-free guidance, autoguidance w of the guide checkpoint's (see sample_fn)."""
    if labels is not None and (not is_conditional(gen) or is_text(gen)):
        raise configs.ConfigError(f"the {gen.stage} model in this workdir is not "
                                  "class-conditional; it cannot take --label")
    if prompts is not None:
        if not is_text(gen):
            raise configs.ConfigError(f"the {gen.stage} model in this workdir is not "
                                      "text-conditioned; it cannot take --prompt")
        if len(prompts) != num:
            raise ValueError(f"{len(prompts)} prompts for {num} samples")
        labels = text.encode_batch(prompts)
    batch = min(batch_size, num)
    run = sample_fn(gen, batch, sampler, steps, eta, autoguidance=autoguidance)
    out = []
    for i in tqdm(range(math.ceil(num / batch)), desc=f"sample {gen.stage}", disable=not progress):
        y = None
        if labels is not None:
            y = np.resize(np.asarray(labels[i * batch:(i + 1) * batch], np.int32),
                          (batch, *labels.shape[1:]))
        out.append(data.to_uint8(np.asarray(run(jax.random.fold_in(key, i), y, guidance))))
    return np.concatenate(out)[:num]


def save_grid(images: np.ndarray, path, ncol: int | None = None) -> None:
    """uint8 [N, 28, 28] -> one PNG grid with a 2-pixel border (path: a name or a file)."""
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * 30 + 2, ncol * 30 + 2), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28] = img
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                 Image.NEAREST).save(path, format="PNG")


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Run directory holding workdir/<stage>.", flag_values=fv)
    flags.DEFINE_enum("stage", "ldm", configs.DIFFUSION_STAGES + tuple(configs.STUDENTS),
                      "Which generator: ldm | pixel, or a few-step student of one: distill | "
                      "distill_pixel.", flag_values=fv)
    flags.DEFINE_integer("num", 64, "Number of samples.", flag_values=fv)
    flags.DEFINE_string("out", "samples.png", "PNG grid path; the .npz goes beside it.",
                        flag_values=fv)
    flags.DEFINE_enum("sampler", None, SAMPLERS, "ddpm (all T steps) | ddim | dpmpp2m "
                      "(DPM-Solver++(2M), deterministic, good at 10-20 steps) (default: the "
                      "model config's sample.sampler).", flag_values=fv)
    flags.DEFINE_integer("steps", None, "DDIM steps (1..T; default: the model config's "
                         "sample.steps); ignored by ddpm.", flag_values=fv)
    flags.DEFINE_float("eta", None, "DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like "
                       "(default: the model config's sample.eta).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to sample (default: the newest).",
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Samples per compiled batch.", flag_values=fv)
    flags.DEFINE_string("label", None, "Conditional models: a digit 0-9, or 'all' for one row "
                        "per digit (num // 10 per row). Default: unconditional (null label).",
                        flag_values=fv)
    flags.DEFINE_multi_string(
        "prompt", None, "Text-conditioned models (--config.model.conditioning=text): what to "
        "draw, e.g. --prompt='a handwritten seven'. Repeat it for one grid row per prompt "
        f"(--num a multiple of their number). At most {text.MAX_CHARS} characters of "
        f"{text.VOCAB!r}, case-insensitive. An empty prompt (--prompt='') is the "
        "unconditional model. Default: unconditional.", flag_values=fv)
    flags.DEFINE_string("prompt_file", None, "Text-conditioned models: a UTF-8 file with one "
                        "prompt per line (blank lines skipped), one grid row per prompt.",
                        flag_values=fv)
    flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance w >= 0: eps = (1 + w) * "
                       "eps(z, c) - w * eps(z, null) (null: the null label, or the empty "
                       "prompt); w = 0 is plain conditional sampling. A student distilled "
                       "with distill.weight_max takes it as its input.", flag_values=fv)
    flags.DEFINE_float("autoguidance", None, "Autoguidance w >= 0: eps = (1 + w) * eps - w * "
                       "eps_guide, the guide being this run's earlier checkpoint at "
                       "sample.guide_step; works unconditionally (default: the model config's "
                       "sample.guide_weight; 0 = off). A student of an unconditional model "
                       "distilled with distill.weight_max takes it as its input (default: "
                       "its sample.weight).", flag_values=fv)
    flags.DEFINE_integer("guide_min_t", None, "Autoguidance only at timesteps t >= this, the "
                         "model alone below (default: the model config's sample.guide_min_t; "
                         "0 = every step).", flag_values=fv)
    flags.DEFINE_integer("eta_min_t", None, "DDIM: fresh noise (eta) only at steps from "
                         "t >= this, deterministic below (default: the model config's "
                         "sample.eta_min_t; 0 = every step).", flag_values=fv)


def parse_labels(label: str | None, num: int) -> tuple[np.ndarray | None, int | None]:
    """--label -> (labels [num] or None, grid columns or None)."""
    if label is None:
        return None, None
    if label == "all":
        if num % 10:
            raise cli.UsageError(f"--label=all draws one row per digit, so --num must be a "
                                 f"multiple of 10, got {num}")
        return np.repeat(np.arange(10, dtype=np.int32), num // 10), num // 10
    if label not in tuple("0123456789"):  # str.isdigit would take '²' and '٣'
        raise cli.UsageError(f"--label must be a digit 0-9 or 'all', got {label!r}")
    return np.full((num,), int(label), np.int32), None


def parse_prompts(prompts: list[str] | None, prompt_file: str | None,
                  num: int) -> tuple[list[str] | None, int | None]:
    """--prompt / --prompt_file -> (num prompts, row by row, or None; grid columns or None).
    Every prompt is checked against the tokenizer here, before any model is loaded."""
    if prompts is not None and prompt_file is not None:
        raise cli.UsageError("give --prompt or --prompt_file, not both")
    if prompt_file is not None:
        if not os.path.isfile(prompt_file):
            raise cli.UsageError(f"--prompt_file {prompt_file} does not exist")
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line for line in f.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise cli.UsageError(f"--prompt_file {prompt_file} cannot be read: {e}") from None
        if not prompts:
            raise cli.UsageError(f"--prompt_file {prompt_file} holds no prompt")
    if prompts is None:
        return None, None
    for p in prompts:
        try:
            text.check_prompt(p)
        except text.PromptError as e:
            raise cli.UsageError(str(e)) from None
    if num % len(prompts):
        raise cli.UsageError(f"{len(prompts)} prompts draw one row each, so --num must be a "
                             f"multiple of {len(prompts)}, got {num}")
    per_row = num // len(prompts)
    return [p for p in prompts for _ in range(per_row)], (per_row if len(prompts) > 1 else None)


def check_sampling_flags(fv) -> None:
    """Sampler, eta and guidance, before any model is loaded."""
    for name in ("num", "steps", "batch_size"):
        if fv[name].value is not None and fv[name].value <= 0:
            raise cli.UsageError(f"--{name} must be positive, got {fv[name].value}")
    try:  # the rules configs.validate applies to sample.*
        if fv.eta is not None:
            configs.check_eta(fv.eta, "--eta")
        configs.check_weight(fv.guidance, "--guidance")
        if fv.autoguidance is not None:
            configs.check_weight(fv.autoguidance, "--autoguidance")
        if fv.guide_min_t is not None and fv.guide_min_t < 0:
            raise configs.ConfigError(f"--guide_min_t must be >= 0, got {fv.guide_min_t}")
    except configs.ConfigError as e:
        raise cli.UsageError(str(e)) from None
    cli.check_seed(fv.seed)


def check_conditioning_flags(fv, gen: Generator, labels, prompts) -> None:
    """--label, --prompt and --guidance against the loaded model's conditioning."""
    mode = gen.config["model"].get("conditioning", "none")
    if prompts is not None and not is_text(gen):
        flag = "--prompt" if fv.prompt is not None else "--prompt_file"
        raise cli.UsageError(f"the {fv.stage} model in {fv.workdir} is not text-conditioned "
                             f"(conditioning={mode}); drop {flag} or train one with "
                             "--config.model.conditioning=text")
    if labels is not None and is_text(gen):
        raise cli.UsageError(f"the {fv.stage} model in {fv.workdir} is text-conditioned; "
                             "use --prompt instead of --label")
    if not is_conditional(gen) and (labels is not None or fv.guidance):
        flag = "--label" if labels is not None else "--guidance"
        raise cli.UsageError(f"the {fv.stage} model in {fv.workdir} is unconditional; drop "
                             f"{flag} or train with --config.model.conditioning=class")


def with_guide_min_t(gen: Generator, min_t: int | None) -> Generator:
    """gen guiding only at t >= min_t (None: as configured); refused for a student, whose
    guidance was fixed when it was distilled, and at or past the model's timesteps."""
    if min_t is None:
        return gen
    if is_student(gen):
        raise cli.UsageError("--guide_min_t is for a teacher's autoguidance; a student's "
                             "guidance was fixed when it was distilled")
    _check_timestep("--guide_min_t", min_t, gen)
    return dataclasses.replace(gen, guide_min_t=min_t)


def with_eta_min_t(gen: Generator, min_t: int | None, sampler: str) -> Generator:
    """gen taking DDIM's eta only at steps from t >= min_t (None: as configured); a min_t
    > 0 is refused for the other samplers (a student's is 'consistency'), and any past the
    model's timesteps."""
    if min_t is None:
        return gen
    if min_t and sampler != "ddim":
        raise cli.UsageError(f"--eta_min_t is for the ddim sampler, not {sampler}")
    _check_timestep("--eta_min_t", min_t, gen)
    return dataclasses.replace(gen, eta_min_t=min_t)


def _check_timestep(flag: str, t: int, gen: Generator) -> None:
    """UsageError unless t is one of the model's timesteps, [0, T)."""
    if not 0 <= t < gen.sched.num_timesteps:
        raise cli.UsageError(f"{flag} must be in [0, {gen.sched.num_timesteps}), the "
                             f"model's timesteps, got {t}")


def sampling_settings(fv, gen: Generator) -> tuple[str, int, float, float]:
    """(sampler, steps, eta, autoguidance): each flag, or else the model config's default."""
    if is_student(gen):
        return _student_settings(fv, gen)
    sampler = fv.sampler or gen.config["sample"].get("sampler", "ddim")
    steps = fv.steps or gen.config["sample"]["steps"]
    eta = gen.config["sample"].get("eta", 0.0) if fv.eta is None else fv.eta
    autoguidance = gen.config["sample"].get("guide_weight", 0.0) \
        if fv.autoguidance is None else fv.autoguidance
    check_autoguidance(gen, autoguidance)
    if sampler != "ddpm" and steps > gen.sched.num_timesteps:
        raise cli.UsageError(f"--steps={steps} exceeds the {gen.sched.num_timesteps} "
                             "timesteps of this model")
    return sampler, steps, eta, autoguidance


def _student_settings(fv, gen: Generator) -> tuple[str, int, float, float]:
    """sampling_settings of a student: its steps, and the weight it takes, if it takes one
    (--guidance for a class teacher's, --autoguidance for the others'; its range checked)."""
    span, cond = student_weight_range(gen), is_conditional(gen)
    flag, other = ("--guidance", "--autoguidance") if cond else ("--autoguidance", "--guidance")
    given, other_given = (fv.guidance, fv.autoguidance) if cond else (fv.autoguidance, fv.guidance)
    if fv.sampler or fv.eta is not None or other_given or (span is None and given):
        drop = other if span else "--autoguidance and --guidance"
        raise cli.UsageError(f"the {gen.stage} student has its own sampler and the guidance "
                             f"it was distilled with; drop --sampler, --eta and {drop}")
    steps = fv.steps or gen.config["sample"]["steps"]
    try:
        check_student_steps(gen, steps)
    except configs.ConfigError as e:
        raise cli.UsageError(str(e)) from None
    if span is None:
        return "consistency", steps, 0.0, 0.0
    w = gen.config["sample"]["weight"] if given is None else given
    if not span[0] <= w <= span[1]:
        raise cli.UsageError(f"{flag}={w:g} is outside [{span[0]:g}, {span[1]:g}], the "
                             f"weights the {gen.stage} student was distilled on")
    return "consistency", steps, 0.0, 0.0 if cond else w


SAMPLE_KEYS = frozenset({"images", "labels", "prompts", "provenance"})  # what write_samples saves


def check_npz_replaceable(out: str) -> None:
    """Refuses an --out whose .npz beside it exists and is not a samples file (trained
    weights, features): writing the grid would replace it."""
    npz = os.path.splitext(out)[0] + ".npz"
    if not os.path.lexists(npz):
        return
    keys = set()
    if zipfile.is_zipfile(npz):  # an npz's arrays are its members' names, less ".npy"
        with zipfile.ZipFile(npz) as z:
            keys = {name.removesuffix(".npy") for name in z.namelist()}
    if "images" not in keys or not keys <= SAMPLE_KEYS:
        raise cli.UsageError(f"{npz} exists and is not a samples file; --out {out} would "
                             "replace it: give another name or move it away")


def write_samples(path: str, images: np.ndarray, ncol: int | None, **extra) -> str:
    """The .npz beside the PNG grid, each written under a unique temporary name and renamed
    (cli.atomic_output), so a failure leaves neither half-written nor a temporary file, and
    two runs writing one --out never mix. Returns the .npz path."""
    npz = os.path.splitext(path)[0] + ".npz"
    with cli.atomic_output(npz) as f_npz, cli.atomic_output(path) as f_png:
        np.savez_compressed(f_npz, images=images, **extra)
        save_grid(images, f_png, ncol)
    return npz


def main(argv: list[str] | None = None) -> None:
    with cli.sigterm_as_interrupt():  # SIGTERM: the one line Ctrl-C prints
        _main(argv)


def _main(argv: list[str] | None) -> None:
    prog = "ldm_jax.sample"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags)
    try:
        cli.require(fv, "workdir")
        check_sampling_flags(fv)
        labels, ncol = parse_labels(fv.label, fv.num)
        prompts, prompt_cols = parse_prompts(fv.prompt, fv.prompt_file, fv.num)
        if prompts is not None and labels is not None:
            raise cli.UsageError("--label is for class-conditional models, --prompt for "
                                 "text-conditioned ones; give one of them")
        ncol = ncol or prompt_cols
        cli.check_workdir(fv.workdir, must_exist=True, writable=False)
        cli.check_out_path(fv.out)
        check_npz_replaceable(fv.out)
        cli.setup_jax()
        gen = load_generator(fv.workdir, fv.stage, fv.step)
        check_conditioning_flags(fv, gen, labels, prompts)
        sampler, steps, eta, autoguidance = sampling_settings(fv, gen)
        gen = with_eta_min_t(with_guide_min_t(gen, fv.guide_min_t), fv.eta_min_t, sampler)
    except (cli.UsageError, configs.ConfigError) as e:
        cli.fail(prog, e)
    try:
        images = generate(gen, fv.num, jax.random.key(fv.seed), sampler, steps, eta,
                          fv.batch_size, labels=labels, guidance=fv.guidance, prompts=prompts,
                          autoguidance=autoguidance)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (cli.sigterm_as_interrupt)
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        sys.exit(cli.interrupted_status(e))
    extra = {} if labels is None else {"labels": labels}
    if prompts is not None:  # a fixed-width unicode array: it loads with allow_pickle=False
        extra["prompts"] = np.array([text.normalize(p) for p in prompts])
    try:
        npz = write_samples(fv.out, images, ncol, **extra)
    except OSError as e:
        if not cli.is_no_space(e):
            raise
        cli.fail(prog, f"no space left on device writing {fv.out}; nothing was written (the "
                       "files there, if any, are those of the last run that finished)")
    mesh = sample_mesh(min(fv.batch_size, fv.num))  # what generate split its batches over
    devices = mesh.size if mesh is not None else 1
    print(f"wrote {fv.out} and {npz} ({len(images)} {fv.stage} samples, {sampler}, "
          f"{devices} device{'s' * (devices > 1)})", file=sys.stderr)

if __name__ == "__main__":
    main()
