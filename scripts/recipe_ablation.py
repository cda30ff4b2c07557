"""Classifier FID of one LDM per diffusion recipe (prediction target x loss weighting x
schedule, and step-budget rows) on one shared VAE: docs/results.md, "The diffusion recipe"
(and the deterministic-sampler line of "Autoguidance, guides and samplers").

    python scripts/recipe_ablation.py --root=runs/recipe --ldm_steps=600 --num=1000
    python scripts/recipe_ablation.py ... --recipes=v+minsnr --first_stage=adv
    python scripts/recipe_ablation.py ... --recipes=v+minsnr --samplers=ddim-10,dpmpp2m-10
    python scripts/recipe_ablation.py --root=runs/recipe_px --stage=pixel --ldm_steps=480 \\
        --recipes=default,2020 --samplers=ddim-50

Each row is sampled with every sampler of --samplers and scored on the committed
classifier's features. With --stage=pixel the rows are pixel models (no VAE) under the same
names and overrides.

Every LDM shares the VAE of ROOT/base/vae (copied into each workdir, so each LDM is bound
to identical weights). --first_stage=NAME trains the VAE of FIRST_STAGES[NAME] into
ROOT/base@NAME instead, and its LDMs into ROOT/<recipe>@NAME (rows '<recipe>@NAME').
Rows of TIME_MATCHED change the cost of a step; they train for the wall clock of
LDM_STEPS default steps instead: their step count is LDM_STEPS x (default step time / their
step time), both measured in turns in this process before training (kept in
ROOT/ablation.json, so a rerun resumes to the same count). Reruns resume: finished stages
train nothing. Writes ROOT/ablation.json and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
from absl import app, flags

from ldm_jax import benchmark, cli, configs, features, sample, score, train

RECIPES = {  # name -> LDM overrides of today's cpu-quick default (v + min_snr, cosine)
    "default": {},  # today's default as is: the reference of the rows trained after it
    "eps": {"diffusion.prediction": "eps", "diffusion.loss_weighting": "uniform"},
    # The 2020 (DDPM) recipe, whole: eps target, uniform weighting, linear betas.
    "2020": {"diffusion.prediction": "eps", "diffusion.loss_weighting": "uniform",
             "diffusion.schedule": "linear"},
    "v": {"diffusion.prediction": "v", "diffusion.loss_weighting": "uniform"},
    "eps+minsnr": {"diffusion.prediction": "eps", "diffusion.loss_weighting": "min_snr"},
    "v+minsnr": {},
    "v+minsnr+ztsnr": {"diffusion.zero_terminal_snr": True},
    "cosine": {"diffusion.schedule": "cosine"},
    "seed1": {"seed": 1},  # the default again, with another seed: the noise of one row
    "cosine+seed1": {"diffusion.schedule": "cosine", "seed": 1},
    "ema0.99": {"optim.ema_decay": 0.99},
    "ema0.9999": {"optim.ema_decay": 0.9999},
    "bs64": {"data.batch_size": 64},
    "bs256": {"data.batch_size": 256},
    "ch32": {"model.ch": 32},
    "ch96": {"model.ch": 96},
    "res2": {"model.num_res_blocks": 2},
    "lr2e-3": {"optim.lr": 2e-3},
    "ch32+lr2e-3": {"model.ch": 32, "optim.lr": 2e-3},
    "ch32+bs64+lr2e-3": {"model.ch": 32, "data.batch_size": 64, "optim.lr": 2e-3},
    # rows against that winner (today's cpu-quick LDM), at the README job's 4,000 steps
    "lr4e-3": {"optim.lr": 4e-3},
    "lr4e-3+seed1": {"optim.lr": 4e-3, "seed": 1},
    "post_mean": {"latent.posterior": "mean"},  # train on posterior means, not samples
    "bs32": {"data.batch_size": 32},
    "lr4e-3+bs32": {"optim.lr": 4e-3, "data.batch_size": 32},
    # The pixel rows' 2020 recipe at the cpu-quick pixel settings of its time (lr 5e-4,
    # batch 128), with a second seed: --stage=pixel --ldm_steps=480
    "2020px+seed1": {"diffusion.prediction": "eps", "diffusion.loss_weighting": "uniform",
                     "diffusion.schedule": "linear", "optim.lr": 5e-4,
                     "data.batch_size": 128, "seed": 1},
    "ch48": {"model.ch": 48},  # a wider U-Net, fewer steps: does 4,000 steps' budget want more width?
}
TIME_MATCHED = ("bs64", "bs256", "ch32", "ch96", "res2", "ch32+lr2e-3", "ch32+bs64+lr2e-3", "bs32",
                "lr4e-3+bs32", "ch48")
FIRST_STAGES = {  # name -> VAE overrides (cpu-quick otherwise)
    "base": {},
    "adv": {"loss.adversarial_weight": 0.5, "loss.adversarial_start": 600},
    "lat2": {"model.latent_ch": 2},
    "vae600": {"train.steps": 600},  # half the VAE steps: is the first stage's time worth it?
    "vaebs64": {"data.batch_size": 64},  # the same VAE steps at about half the cost each
}

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "runs/recipe", "One workdir per row below it, and ablation.json.")
flags.DEFINE_integer("ldm_steps", 600, "Steps of each row (time-matched rows: their wall clock).")
flags.DEFINE_integer("vae_steps", 1200, "Steps of the shared VAE.")
flags.DEFINE_integer("num", 1000, "Samples per row and sampler.")
flags.DEFINE_list("recipes", [], "Rows to train, names of RECIPES (empty: all of them).")
flags.DEFINE_enum("first_stage", "base", list(FIRST_STAGES), "The VAE under the rows.")
flags.DEFINE_list("samplers", ["ddim-50", "ddim-20", "dpmpp2m-20"], "SAMPLER-STEPS pairs.")
flags.DEFINE_enum("stage", "ldm", list(configs.DIFFUSION_STAGES), "The rows' stage.")
flags.register_validator("recipes", lambda v: set(v) <= set(RECIPES),
                         message=f"--recipes takes names of RECIPES: {', '.join(RECIPES)}")


def matched_steps(c, base, workdir: str, steps: int, rounds: int = 4, per_round: int = 5) -> dict:
    """Steps of config c that cost the wall clock of `steps` steps of config base: both
    compiled, then timed in turns (medians over rounds x per_round steps each)."""
    timers = [benchmark.StepTimer(x, workdir) for x in (base, c)]
    base_s, row_s = benchmark.median_step_s_in_turns(timers, rounds, per_round)
    return dict(base_step_s=base_s, row_step_s=row_s, steps=max(1, round(steps * base_s / row_s)))


def parse_samplers(specs: list[str]) -> list[tuple[str, int]]:
    """'ddim-50' -> ('ddim', 50), checked against the samplers sample knows."""
    out = []
    for spec in specs:
        name, _, steps = spec.partition("-")
        if name not in configs.SAMPLERS or not steps.isdigit():
            raise app.UsageError(f"--samplers: {spec!r} is not SAMPLER-STEPS with SAMPLER one of "
                                 f"{', '.join(configs.SAMPLERS)}")
        out.append((name, int(steps)))
    return out


def print_table(results: dict) -> None:
    """The markdown table of every scored (recipe, sampler) row, plans left out."""
    print("| recipe | sampler | classifier FID | recognisable | steps | train s | sample s |")
    print("|---|---|---|---|---|---|---|")
    for key, row in results.items():
        recipe, sampler = key.split(" | ")
        if sampler == "plan":
            continue
        print(f"| {recipe} | {sampler} | {row['fid']:.2f} | {row['recognisable']:.3f} "
              f"| {row['steps']} | {row['train_s']:.0f} | {row['sample_s']:.1f} |")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    root, ldm_steps, vae_steps, num = FLAGS.root, FLAGS.ldm_steps, FLAGS.vae_steps, FLAGS.num
    recipes, first_stage, stage = FLAGS.recipes or list(RECIPES), FLAGS.first_stage, FLAGS.stage
    samplers = parse_samplers(FLAGS.samplers)
    suffix = "" if first_stage == "base" else f"@{first_stage}"
    cli.setup_jax()
    base = os.path.join(root, "base" + suffix)
    if stage == "ldm":
        vae = configs.get_config("vae", "cpu-quick")
        configs.apply_overrides(vae, {"train.steps": vae_steps, **FIRST_STAGES[first_stage]})
        train.train_and_evaluate(vae, base)

    ref = score.Reference(features.DEFAULT_PATH, num)
    out_path = os.path.join(root, "ablation.json")
    results = json.load(open(out_path)) if os.path.isfile(out_path) else {}
    for row in results.values():  # files written before the rename call it "confident"
        if "confident" in row:
            row["recognisable"] = row.pop("confident")
    for name in (r + suffix for r in recipes):
        w = os.path.join(root, name)
        if stage == "ldm" and not os.path.isdir(os.path.join(w, "vae")):
            shutil.copytree(os.path.join(base, "vae"), os.path.join(w, "vae"))
        recipe = name.split("@")[0]
        c = configs.get_config(stage, "cpu-quick")
        # The rows sample without autoguidance, so no guide checkpoint is kept.
        configs.apply_overrides(c, {"train.steps": ldm_steps, "sample.guide_step": 0,
                                    "sample.guide_weight": 0.0, **RECIPES[recipe]})
        if recipe in TIME_MATCHED:
            plan_key = f"{name} | plan"
            if plan_key not in results:
                base_c = configs.get_config(stage, "cpu-quick")
                configs.apply_overrides(base_c, {"train.steps": ldm_steps})
                results[plan_key] = matched_steps(c, base_c, w, ldm_steps)
                json.dump(results, open(out_path, "w"), indent=1)
            c.train.steps = results[plan_key]["steps"]
            print(f"{name}: {results[plan_key]}", file=sys.stderr)
        t0 = time.time()
        train.train_and_evaluate(c, w)
        rows = [json.loads(line) for line in open(os.path.join(w, stage, "metrics.jsonl"))]
        gen = sample.load_generator(w, stage)
        for sampler, steps in samplers:
            key = f"{name} | {sampler}-{steps}"
            if key in results and results[key].get("identity") == gen.identity:
                continue
            t = time.time()
            images = sample.generate(gen, num, jax.random.key(1), sampler, steps, progress=False)
            sample_s = time.time() - t
            scores = ref.score(images)
            row = dict(fid=scores["fid"], recognisable=scores["recognisable"], sample_s=sample_s,
                       train_s=rows[-1]["time"], steps=rows[-1]["step"], identity=gen.identity)
            results[key] = row
            json.dump(results, open(out_path, "w"), indent=1)
            print(f"{key}: FID {row['fid']:.2f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    print_table(results)


if __name__ == "__main__":
    app.run(main)
