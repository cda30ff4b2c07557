"""The diffusion-recipe ablation of docs/results.md (issue 10): one VAE, then one LDM per
recipe (prediction target x loss weighting x schedule) at the same step budget, each
sampled with several samplers, scored on the committed classifier's features.

    python scripts/recipe_ablation.py --root=runs/recipe --ldm_steps=600 --num=1000
    python scripts/recipe_ablation.py ... --recipes=v+minsnr --first_stage=adv

Every LDM shares the VAE of ROOT/base/vae (copied into each workdir, so each LDM is bound
to identical weights). --first_stage=NAME trains the VAE of FIRST_STAGES[NAME] into
ROOT/base@NAME instead, and its LDMs into ROOT/<recipe>@NAME (rows '<recipe>@NAME').
Reruns resume: finished stages train nothing. Writes ROOT/ablation.json and prints a
markdown table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import numpy as np

from ldm_jax import cli, configs, evaluate, features, metrics, sample, train

RECIPES = {  # name -> diffusion overrides
    "eps": {},
    "v": {"diffusion.prediction": "v"},
    "eps+minsnr": {"diffusion.loss_weighting": "min_snr"},
    "v+minsnr": {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr"},
    "v+minsnr+ztsnr": {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr",
                       "diffusion.zero_terminal_snr": True},
}
FIRST_STAGES = {  # name -> VAE overrides (cpu-quick otherwise)
    "base": {},
    "adv": {"loss.adversarial_weight": 0.5, "loss.adversarial_start": 600},
}
SAMPLERS = (("ddim", 50), ("ddim", 20), ("dpmpp2m", 20))


def main() -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    root = args.get("root", "runs/recipe")
    ldm_steps, vae_steps = int(args.get("ldm_steps", 600)), int(args.get("vae_steps", 1200))
    num = int(args.get("num", 1000))
    recipes = args["recipes"].split(",") if "recipes" in args else list(RECIPES)
    first_stage = args.get("first_stage", "base")
    suffix = "" if first_stage == "base" else f"@{first_stage}"
    cli.setup_jax()
    base = os.path.join(root, "base" + suffix)
    vae = configs.get_config("vae", "cpu-quick")
    configs.apply_overrides(vae, {"train.steps": vae_steps, **FIRST_STAGES[first_stage]})
    train.train_and_evaluate(vae, base)

    feat_fn = features.feature_fn(features.DEFAULT_PATH)
    probs_fn = features.probabilities_fn(features.DEFAULT_PATH)
    real_all = evaluate.reference_features(feat_fn, features.DEFAULT_PATH)
    out_path = os.path.join(root, "ablation.json")
    results = json.load(open(out_path)) if os.path.isfile(out_path) else {}
    for name in (r + suffix for r in recipes):
        w = os.path.join(root, name)
        if not os.path.isdir(os.path.join(w, "vae")):
            shutil.copytree(os.path.join(base, "vae"), os.path.join(w, "vae"))
        c = configs.get_config("ldm", "cpu-quick")
        configs.apply_overrides(c, {"train.steps": ldm_steps, **RECIPES[name.split("@")[0]]})
        t0 = time.time()
        train.train_and_evaluate(c, w)
        rows = [json.loads(line) for line in open(os.path.join(w, "ldm", "metrics.jsonl"))]
        gen = sample.load_generator(w, "ldm")
        for sampler, steps in SAMPLERS:
            key = f"{name} | {sampler}-{steps}"
            if key in results and results[key].get("identity") == gen.identity:
                continue
            t = time.time()
            images = sample.generate(gen, num, jax.random.key(1), sampler, steps, progress=False)
            sample_s = time.time() - t
            feats = feat_fn(images)
            row = dict(fid=metrics.fid_from_features(real_all, feats), sample_s=sample_s,
                       train_s=rows[-1]["time"], steps=rows[-1]["step"], identity=gen.identity)
            row["confident"] = float(np.mean(probs_fn(images).max(-1) > 0.9))
            results[key] = row
            json.dump(results, open(out_path, "w"), indent=1)
            print(f"{key}: FID {row['fid']:.2f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    print("| recipe | sampler | classifier FID | confident | train s | sample s |")
    print("|---|---|---|---|---|---|")
    for key, row in results.items():
        recipe, sampler = key.split(" | ")
        print(f"| {recipe} | {sampler} | {row['fid']:.2f} | {row['confident']:.3f} "
              f"| {row['train_s']:.0f} | {row['sample_s']:.1f} |")


if __name__ == "__main__":
    main()
