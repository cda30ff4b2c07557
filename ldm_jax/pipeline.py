"""The whole LDM pipeline in one command: VAE -> LDM -> sample grid (-> pixel baseline, report).

    python -m ldm_jax.pipeline --workdir=runs/demo --preset=cpu-quick
    python -m ldm_jax.pipeline --workdir=runs/demo --preset=cpu-quick --stages=vae,ldm,pixel --report

Each stage is the same `train_and_evaluate` that `python -m ldm_jax.train` runs, so a
killed pipeline resumes where it stopped when rerun. The grid is workdir/ldm_samples.png
(and .npz); `--report` then runs `ldm_jax.evaluate` on the workdir.
"""

from __future__ import annotations

import os
import sys
import time

import jax

from ldm_jax import cli, configs, data, sample, train


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Run directory (one subdirectory per stage).",
                        flag_values=fv)
    flags.DEFINE_string("preset", "cpu-quick", f"Config preset: {' | '.join(configs.PRESETS)}.",
                        flag_values=fv)
    flags.DEFINE_list("stages", ["vae", "ldm"], "Stages to train, in order (vae, ldm, pixel).",
                      flag_values=fv)
    flags.DEFINE_integer("num", 100, "Samples in the grid of each trained generator.",
                         flag_values=fv)
    flags.DEFINE_bool("report", False, "Run ldm_jax.evaluate on the workdir at the end.",
                      flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    prog = "ldm_jax.pipeline"
    fv = cli.parse_flags(prog, argv or sys.argv, define_flags)
    try:
        cli.require(fv, "workdir")
        if fv.num <= 0:
            raise cli.UsageError(f"--num must be positive, got {fv.num}")
        unknown = [s for s in fv.stages if s not in ("vae", "ldm", "pixel")]
        if unknown:
            raise cli.UsageError(f"unknown stage {unknown[0]!r} in --stages; use vae, ldm, pixel")
        if "ldm" in fv.stages and "vae" not in fv.stages and \
                train.load_checkpoint(os.path.join(fv.workdir, "vae")) is None:
            raise configs.ConfigError(f"--stages has ldm without vae and {fv.workdir}/vae is empty")
        cfgs = [configs.get_config(s, fv.preset) for s in fv.stages]
        for c in cfgs:
            configs.validate(c)
        for c in cfgs:  # refuse before training anything if a stage could not resume
            train.check_resumable(c, os.path.join(fv.workdir, c.stage))
        cli.setup_jax()
        t0 = time.time()
        for c in cfgs:
            train.train_and_evaluate(c, fv.workdir)
        for stage in (s for s in fv.stages if s in configs.DIFFUSION_STAGES):
            gen = sample.load_generator(fv.workdir, stage)
            steps = gen.config["sample"]["steps"]
            images = sample.generate(gen, fv.num, jax.random.key(0), "ddim", steps)
            out = os.path.join(fv.workdir, f"{stage}_samples.png")
            sample.save_grid(images, out)
            import numpy as np  # pylint: disable=import-outside-toplevel
            np.savez_compressed(os.path.splitext(out)[0] + ".npz", images=images)
            print(f"{stage}: wrote {out} ({fv.num} samples, DDIM {steps} steps)", file=sys.stderr)
        print(f"pipeline: {', '.join(fv.stages)} done in {time.time() - t0:.0f}s", file=sys.stderr)
    except (cli.UsageError, configs.ConfigError, data.DataError) as e:
        cli.fail(prog, e)
    except train.TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(1)
    if fv.report:
        from ldm_jax import evaluate  # pylint: disable=import-outside-toplevel
        evaluate.main([prog, f"--workdir={fv.workdir}", f"--preset={fv.preset}"])


if __name__ == "__main__":
    main()
