"""The whole LDM pipeline in one command: VAE -> LDM -> sample grid (-> pixel baseline, report).

    python -m ldm_jax.pipeline --workdir=runs/demo --preset=cpu-quick
    python -m ldm_jax.pipeline --workdir=runs/demo --preset=cpu-quick --stages=vae,ldm,pixel --report
    python -m ldm_jax.pipeline --workdir=runs/demo --config.ldm.train.steps=600

Each stage is the same `train_and_evaluate` that `python -m ldm_jax.train` runs, so a
killed pipeline resumes where it stopped when rerun; `--config.<stage>.*` overrides one
stage's config. The grid is workdir/<stage>_samples.png, drawn with the stage's
sample.{sampler, steps, eta, guide_weight} and seed 0; its .npz records which weights and
settings made it. A rerun redraws nothing that is up to date, refuses (exit 2) to replace a grid drawn
with other settings, and keeps a grid of an earlier model beside the new one.
`--report` then runs `ldm_jax.evaluate` on the workdir.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile

import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from ldm_jax import checkpoints, cli, configs, data, sample, stages, train

PIPELINE_STAGES = ("vae", "ldm", "pixel", *configs.STUDENTS)
SEED = 0  # the sampling seed of the pipeline's grids


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Run directory (one subdirectory per stage).",
                        flag_values=fv)
    flags.DEFINE_string("preset", "cpu-quick", f"Config preset: {' | '.join(configs.PRESETS)}.",
                        flag_values=fv)
    flags.DEFINE_list("stages", ["vae", "ldm"], "Stages to train, in order (vae, ldm, pixel, distill, distill_pixel).",
                      flag_values=fv)
    flags.DEFINE_integer("num", 100, "Samples in the grid of each trained generator.",
                         flag_values=fv)
    flags.DEFINE_bool("report", False, "Run ldm_jax.evaluate on the workdir at the end.",
                      flag_values=fv)


def stage_configs(fv) -> list[ml_collections.ConfigDict]:
    """get_config(stage, preset) for each of --stages, with that stage's --config.<stage>.*
    overrides, validated."""
    overrides = config_flags.get_override_values(fv["config"])
    unused = sorted({k.split(".")[0] for k in overrides} - set(fv.stages))
    if unused:
        raise cli.UsageError(f"--config.{unused[0]}.* overrides a stage not in --stages")
    cfgs = []
    for stage in fv.stages:
        c = configs.get_config(stage, fv.preset)
        configs.apply_overrides(c, {k.split(".", 1)[1]: v for k, v in overrides.items()
                                    if k.split(".")[0] == stage})
        configs.validate(c)
        cfgs.append(c)
    return cfgs


def samples_request(num: int, steps: int, sampler: str, eta: float,
                    autoguidance: float = 0.0, guide_min_t: int | None = None,
                    eta_min_t: int | None = None) -> dict:
    """What a stage's grid is drawn with (guide_min_t, eta_min_t: None for a student)."""
    request = dict(num=num, seed=SEED, sampler=sampler, steps=steps, eta=eta,
                   autoguidance=autoguidance)
    for name, t in (("guide_min_t", guide_min_t), ("eta_min_t", eta_min_t)):
        if t is not None:
            request[name] = t
    return request


# What a grid saved before a setting was recorded was drawn with.
REQUEST_DEFAULTS = dict(autoguidance=0.0, guide_min_t=0, eta_min_t=0)


def saved_samples_info(npz_path: str) -> dict | None:
    """The provenance JSON stored in a pipeline grid's .npz ({} if it has none; None if
    there is no such file, or one that cannot be read: cut off by a kill or a full disk,
    it is no grid and is drawn again)."""
    if not os.path.exists(npz_path):
        return None
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            return json.loads(str(z["provenance"])) if "provenance" in z.files else {}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def check_saved_samples(workdir: str, stage: str, request: dict) -> None:
    """Refuses (before any training) to replace a grid drawn with other settings, or to
    write one where a directory stands."""
    for ext in (".png", ".npz"):
        if os.path.isdir(grid := os.path.join(workdir, f"{stage}_samples{ext}")):
            raise cli.UsageError(f"{grid}, where the {stage} grid goes, is a directory; move it away")
    path = os.path.join(workdir, f"{stage}_samples.npz")
    info = saved_samples_info(path)
    if info is None:
        return
    old = {k: info.get(k, REQUEST_DEFAULTS.get(k)) for k in request}
    if old != request:
        diff = ", ".join(f"{k}={old[k]}" for k in request if old[k] != request[k]) or "unknown"
        raise cli.UsageError(f"{path} holds samples drawn with other settings ({diff}); move "
                             "it (and its .png) away, or rerun with those settings")


def write_samples(workdir: str, gen: sample.Generator, request: dict) -> str:
    """Draws the grid unless the saved one is this model's with these settings; a grid of
    an earlier model is kept beside it, never overwritten. Returns what it did."""
    base = os.path.join(workdir, f"{gen.stage}_samples")
    info = saved_samples_info(base + ".npz")
    provenance = dict(request, stage=gen.stage, step=gen.step, identity=gen.identity)
    if info and info.get("identity") == gen.identity:
        return f"{base}.png is up to date ({request['num']} samples)"
    note = ""
    if info is not None:  # a grid of another model: keep it under its own name
        old = f"{base}.{(info.get('identity') or 'unknown')[:12]}"
        for ext in (".png", ".npz"):
            if os.path.exists(base + ext):
                os.replace(base + ext, old + ext)
        note = f"; the earlier grid is now {old}.png"
    gen = sample.with_eta_min_t(sample.with_guide_min_t(gen, request.get("guide_min_t")),
                                request.get("eta_min_t"), request["sampler"])
    images = sample.generate(gen, request["num"], jax.random.key(SEED), request["sampler"],
                             request["steps"], request["eta"],
                             autoguidance=request["autoguidance"])
    with cli.atomic_output(base + ".npz") as f_npz, cli.atomic_output(base + ".png") as f_png:
        np.savez_compressed(f_npz, images=images, provenance=np.array(json.dumps(provenance)))
        sample.save_grid(images, f_png)
    return (f"wrote {base}.png ({request['num']} samples, {request['sampler']} "
            f"{request['steps']} steps){note}")


def student_weight(c, cfgs: list, workdir: str) -> float:
    """The autoguidance weight the grid of student config c is drawn at (0 unless it takes
    one: sample.default_student_weight, with its teacher's config from this pipeline or,
    if it does not train the teacher, from the teacher's checkpoint)."""
    if not configs.student_takes_weight(c.distill):
        return 0.0
    teacher = next((t for t in cfgs if t.stage == configs.STUDENTS[c.stage]), None)
    stored = teacher.to_dict() if teacher is not None else checkpoints.stored_config(
        os.path.join(workdir, configs.STUDENTS[c.stage])) or {"model": {}, "sample": {}}
    return sample.default_student_weight(c.to_dict(), stored)


def check_plan(cfgs: list, workdir: str) -> None:
    """Refuses, before anything trains, what a stage would refuse only after the stages
    before it had trained: a config that cannot resume, a VAE trained further under its
    LDM, a student whose teacher the plan trains further or that has changed since."""
    planned = {c.stage: c for c in cfgs}
    for c in cfgs:
        checkpoints.check_resumable(c, os.path.join(workdir, c.stage))
        if train.will_train(c, workdir):
            train.check_no_dependents(c, workdir)
    for student in [s for s in planned if s in configs.STUDENTS]:
        bound = checkpoints.stored_meta(os.path.join(workdir, student))
        teacher = configs.STUDENTS[student]
        if bound is None:
            continue
        if teacher in planned and train.will_train(planned[teacher], workdir):
            raise configs.ConfigError(
                f"training {teacher} further would leave behind the student in {workdir}/"
                f"{student}, distilled from its step {bound.get('teacher_step')}; use a new "
                f"workdir, or drop {student} from --stages to train on and give the student up")
        checkpoints.check_teacher(workdir, student, bound)
    if "ldm" in planned:
        check_ldm_holdout(planned, workdir)


def check_ldm_holdout(planned: dict, workdir: str) -> None:
    """stages.check_first_stage_holdout, before the VAE trains: the VAE the LDM will get is
    the planned one if the plan trains it, else the one in the workdir."""
    vae = planned.get("vae")
    vae_cfg = (vae.to_dict() if vae is not None and train.will_train(vae, workdir)
               else checkpoints.stored_config(os.path.join(workdir, "vae")))
    if vae_cfg is not None:
        stages.check_first_stage_holdout(vae_cfg, planned["ldm"], workdir)


def check_stage_list(stages: list[str], workdir: str) -> None:
    """--stages: known, each once, and each model's parent (the LDM's VAE, a student's
    teacher) trained earlier in the list or already in the workdir."""
    if not stages:
        raise cli.UsageError("--stages is empty; name at least one of "
                             + ", ".join(PIPELINE_STAGES))
    unknown = [s for s in stages if s not in PIPELINE_STAGES]
    if unknown:
        raise cli.UsageError(f"unknown stage {unknown[0]!r} in --stages; use "
                             + ", ".join(PIPELINE_STAGES))
    if len(set(stages)) != len(stages):
        raise cli.UsageError(f"--stages names a stage twice: {','.join(stages)}")
    cli.check_workdir(workdir)
    parents = {"ldm": "vae", **configs.STUDENTS}
    for i, stage in enumerate(stages):
        parent = parents.get(stage)
        if parent is None or parent in stages[:i]:
            continue
        if parent in stages:
            raise cli.UsageError(f"--stages lists {stage} before {parent}, which it is trained on")
        if checkpoints.stored_meta(os.path.join(workdir, parent)) is None:
            raise configs.ConfigError(f"--stages has {stage} without {parent} and "
                                      f"{workdir}/{parent} is empty")


def main(argv: list[str] | None = None) -> None:
    with cli.sigterm_as_interrupt():  # SIGTERM: the one line Ctrl-C prints
        _main(argv)


def _main(argv: list[str] | None) -> None:
    prog = "ldm_jax.pipeline"
    fv = cli.parse_flags(
        prog, argv or sys.argv, define_flags, with_config=True,
        config_schema=ml_collections.ConfigDict({s: configs.union_config() for s in PIPELINE_STAGES}),
        config_help="Per-stage config overrides: --config.<stage>.<section>.<field>=value, "
                    "e.g. --config.ldm.train.steps=600 (see ldm_jax/configs.py).")
    try:
        cli.require(fv, "workdir")
        if fv.num <= 0:
            raise cli.UsageError(f"--num must be positive, got {fv.num}")
        check_stage_list(fv.stages, fv.workdir)
        cfgs = stage_configs(fv)
        check_plan(cfgs, fv.workdir)
        requests = {}
        for c in cfgs:  # refuse before training anything to replace a grid
            if c.stage in configs.STUDENTS:
                requests[c.stage] = samples_request(fv.num, c.sample.steps, "consistency", 0.0,
                                                    student_weight(c, cfgs, fv.workdir))
            elif c.stage in configs.DIFFUSION_STAGES:
                requests[c.stage] = samples_request(fv.num, c.sample.steps, c.sample.sampler,
                                                    c.sample.eta, c.sample.guide_weight,
                                                    c.sample.guide_min_t, c.sample.eta_min_t)
            if c.stage in requests:
                check_saved_samples(fv.workdir, c.stage, requests[c.stage])
        cli.setup_jax()
        t0 = time.time()
        for c in cfgs:
            train.train_and_evaluate(c, fv.workdir)
        for stage, request in requests.items():
            gen = sample.load_generator(fv.workdir, stage)
            print(f"{stage}: {write_samples(fv.workdir, gen, request)}", file=sys.stderr)
        print(f"pipeline: {', '.join(fv.stages)} done in {time.time() - t0:.0f}s", file=sys.stderr)
    except (cli.UsageError, configs.ConfigError, data.DataError) as e:
        cli.fail(prog, e)
    except train.TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(1)
    except (train.TrainingInterrupted, KeyboardInterrupt) as e:
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "status", None) or cli.interrupted_status(e))
    if fv.report:
        from ldm_jax import evaluate  # pylint: disable=import-outside-toplevel
        evaluate.main([prog, f"--workdir={fv.workdir}", f"--preset={fv.preset}"])


if __name__ == "__main__":
    main()
