"""Quality and cost of every trained generator in a workdir, side by side, with floors.

    python -m ldm_jax.evaluate --workdir=runs/demo [--preset=cpu-quick] [--num=N]

For each of workdir/ldm and workdir/pixel that holds a trained model: N samples (DDIM),
their MNIST-classifier features, FID against the 10,000 MNIST test images, precision and
recall (k=3) and density and coverage (k=5) against N test images; the same metrics for N
training images (the real-vs-real floor); with --inception, FID on the TF-FID InceptionV3
features too. Cost, each measured in its own process (ldm_jax.benchmark): train seconds per
iteration at the same batch size, images/s for DDIM-10, DDIM-50 and the full DDPM chain,
compile times, peak memory, parameter count. Writes workdir/eval/{metrics.json, report.md,
samples.png, cost.png, <stage>_samples.npz}; a rerun reuses <stage>_samples.npz only when
they come from the same weights (sample.Generator.identity), sampler, steps and size.

Each distilled student (workdir/distill, workdir/distill_pixel) adds a few-step table: the
student at 1, 2, 4 and 8 steps beside its teacher's default sampler (ldm_jax.fewstep), and
<student>_few_step.png.

A class-conditional model adds a guidance sweep (accuracy against the requested digit);
a text-conditioned one adds a prompt sweep at w in TEXT_GUIDANCE (`prompt_sweep`) and
prompts.png, prompts against samples. For a conditional model the quality table's row is
the unconditional model: the null label, or the empty prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import (checkpoints, cli, configs, data, features, fewstep, inception, metrics, nets,
                     sample, text)

# Per preset: (samples per model, DDIM steps for the quality samples).
PLAN = {"smoke": (128, 5), "cpu-quick": (2000, 50), "full": (10_000, 100)}
QUALITY = ("fid", "precision", "recall", "density", "coverage")
COVERAGE = ("recognisable", "class_kl")  # metrics.class_coverage, on the classifier's probabilities
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
TEXT_GUIDANCE = (0.0, 1.0, 2.0, 4.0)
RECOGNISABLE = metrics.RECOGNISABLE  # the one threshold, defined beside recognisable_share
FIGURE_W = 2.0  # guidance of prompts.png
FIGURE_PROMPTS = ("7", "seven", "a handwritten 3", "number four, written by hand",
                  "the handwritten number 5", "a drawing of an eight", "picture of digit 0", "")
MIN_NUM = 6  # PRDC's k = 5 nearest neighbours need at least 6 samples
SAMPLE_SEED = 1  # jax.random.key of the quality samples


# What reading a cut-off or garbled .npz raises: such a cache is treated as absent.
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def trained_stages(workdir: str) -> list[str]:
    return [s for s in configs.DIFFUSION_STAGES
            if os.path.isdir(os.path.join(workdir, s, "checkpoints"))]


def _cache_dir() -> str:
    d = os.environ.get("LDM_JAX_CACHE_DIR", os.path.expanduser("~/.cache/ldm_jax"))
    os.makedirs(d, exist_ok=True)
    return d


def reference_features(feat_fn, classifier_path: str) -> np.ndarray:
    """Classifier features of the 10,000 MNIST test images, computed once and cached
    (keyed by the classifier file's MD5)."""
    with open(classifier_path, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()[:12]
    path = os.path.join(_cache_dir(), f"mnist_test_features_{digest}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["features"]
        except UNREADABLE:  # a cut-off cache is no cache: compute it again
            pass
    test_images, _ = data.load("package", "test")
    feats = feat_fn(test_images)
    with cli.atomic_output(path) as f:
        np.savez(f, features=feats)
    return feats


def quality(real_all: np.ndarray, real_n: np.ndarray, fake: np.ndarray) -> dict:
    """FID against all test features; PRDC against N test features."""
    out = {"fid": metrics.fid_from_features(real_all, fake)}
    out.update(metrics.prdc(real_n, fake, k_pr=3, k_dc=5))
    return {k: float(out[k]) for k in QUALITY}


def save_samples(out_dir: str, gen, images: np.ndarray, steps: int, eta: float = 0.0,
                 autoguidance: float = 0.0) -> None:
    """The quality samples, with what they were drawn from (see cached_samples), written
    under a unique temporary name and renamed (a kill mid-write leaves the old file)."""
    with cli.atomic_output(os.path.join(out_dir, f"{gen.stage}_samples.npz")) as f:
        np.savez_compressed(f, images=images, identity=np.array(gen.identity),
                            model_step=gen.step, sampler="ddim", ddim_steps=steps,
                            ddim_eta=float(eta), seed=SAMPLE_SEED, autoguidance=float(autoguidance))


def cached_samples(out_dir: str, gen, num: int, steps: int, eta: float = 0.0,
                   autoguidance: float = 0.0) -> np.ndarray | None:
    """Samples an earlier evaluate run saved for these very weights (gen.identity, the
    digest of the parameters that sample), sampler, steps, eta, autoguidance, seed and size,
    else None. A file without an identity or an eta (written before they were recorded) is
    never reused; one without an autoguidance weight was drawn without it (w = 0)."""
    path = os.path.join(out_dir, f"{gen.stage}_samples.npz")
    if not os.path.isfile(path) or not gen.identity:
        return None
    want = dict(identity=gen.identity, sampler="ddim", ddim_steps=steps, ddim_eta=float(eta),
                seed=SAMPLE_SEED)
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_w = z["autoguidance"].item() if "autoguidance" in z.files else 0.0
            if (all(k in z.files for k in want) and "images" in z.files
                    and stored_w == float(autoguidance)
                    and all(z[k].item() == v for k, v in want.items())
                    and len(z["images"]) == num):
                print(f"{gen.stage}: reusing {num} samples from {path}", file=sys.stderr)
                return z["images"]
    except UNREADABLE:  # unreadable (cut off, garbled): sample again and overwrite it
        pass
    return None


def guidance_sweep(gen, num: int, steps: int, feat_fn, pred_fn, real_all, real_n,
                   weights=GUIDANCE) -> dict:
    """For each guidance weight w: FID/PRDC and conditional accuracy, the share of samples
    the MNIST classifier assigns to the requested label, over num // 10 samples per digit."""
    per_class = max(1, num // 10)
    labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
    rows = {}
    for w in weights:
        images = sample.generate(gen, len(labels), jax.random.key(2), "ddim", steps,
                                 labels=labels, guidance=w)
        row = quality(real_all, real_n, feat_fn(images))
        row["accuracy"] = float(np.mean(pred_fn(images) == labels))
        rows[str(w)] = row
        print(f"{gen.stage} w={w}: accuracy {row['accuracy']:.4f}, FID {row['fid']:.3f}",
              file=sys.stderr)
    return rows


def held_out_prompts(num: int, pairs, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """num // 10 prompts per digit, each from a random (template, spelling) of pairs:
    (prompts, digits [N], spellings [N])."""
    rng = np.random.default_rng(seed)
    digits = np.repeat(np.arange(10), max(1, num // 10))
    pick = rng.integers(len(pairs), size=len(digits))
    return ([text.make_prompt(int(d), *pairs[i]) for d, i in zip(digits, pick)], digits,
            np.array([pairs[i][1] for i in pick]))


def prompt_sweep(gen, num: int, steps: int, feat_fn, prob_fn, real_all, real_n,
                 weights=TEXT_GUIDANCE) -> dict:
    """For each guidance weight w, the committed classifier's accuracy against the digit
    each prompt names:
    - seen: num prompts from the training (template, spelling) pairs;
    - held_out: num prompts from pairs never trained on (text.HELD_OUT_PAIRS);
    - words / numerals: seen and held-out together, split by how the digit is spelled;
    - same_digit: "7" and "seven" (every digit, num // 2 pairs, the same noise for
      both) classified as the same digit; bare_numeral / bare_word: their accuracy;
    and FID/PRDC and the recognisable share (top probability > RECOGNISABLE) of the seen
    samples. The seen and held-out sets share their noise, sample for sample."""
    sets = {"seen": held_out_prompts(num, text.TRAIN_PAIRS, 0),
            "held_out": held_out_prompts(num, text.HELD_OUT_PAIRS, 1)}
    bare = np.repeat(np.arange(10), max(1, num // 20))
    draw = lambda prompts, key, w: sample.generate(gen, len(prompts), jax.random.key(key),
                                                   "ddim", steps, prompts=prompts, guidance=w,
                                                   progress=False)
    rows = {}
    for w in weights:
        row, correct, spelled = {}, [], []
        for name, (prompts, digits, spellings) in sets.items():
            images = draw(prompts, 2, w)
            probs = prob_fn(images)
            ok = probs.argmax(1) == digits
            row[name] = float(ok.mean())
            correct.append(ok)
            spelled.append(spellings)
            if name == "seen":
                row.update(quality(real_all, real_n, feat_fn(images)))
                row["recognisable"] = metrics.recognisable_share(probs)
        correct, spelled = np.concatenate(correct), np.concatenate(spelled)
        row["words"] = float(correct[spelled == "word"].mean())
        row["numerals"] = float(correct[spelled == "numeral"].mean())
        numeral = prob_fn(draw([str(d) for d in bare], 3, w)).argmax(1)
        word = prob_fn(draw([text.WORDS[d] for d in bare], 3, w)).argmax(1)
        row.update(same_digit=float(np.mean(numeral == word)),
                   bare_numeral=float(np.mean(numeral == bare)),
                   bare_word=float(np.mean(word == bare)))
        rows[str(w)] = row
        print(f"{gen.stage} w={w}: seen {row['seen']:.4f}, held-out {row['held_out']:.4f}, "
              f"words {row['words']:.4f}, numerals {row['numerals']:.4f}, \"7\" = \"seven\" "
              f"{row['same_digit']:.4f}, FID {row['fid']:.3f}", file=sys.stderr)
    return rows


def save_prompt_figure(gen, steps: int, path: str, prompts=FIGURE_PROMPTS, per_row: int = 8,
                       w: float = FIGURE_W) -> None:
    """prompts.png: one row of samples per prompt, the prompt written beside it."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    prompts = list(prompts)
    images = sample.generate(gen, len(prompts) * per_row, jax.random.key(4), "ddim", steps,
                             prompts=[p for p in prompts for _ in range(per_row)], guidance=w,
                             progress=False)
    seen = {text.make_prompt(d, t, s) for t, s in text.TRAIN_PAIRS for d in range(10)}
    fig, axes = plt.subplots(len(prompts), 1, figsize=(per_row * 0.9 + 3.2, len(prompts) * 0.95))
    for i, (ax, p) in enumerate(zip(np.atleast_1d(axes), prompts)):
        ax.imshow(np.concatenate(list(images[i * per_row:(i + 1) * per_row]), axis=1),
                  cmap="gray", vmin=0, vmax=255)
        kind = "empty: unconditional" if not p else ("seen" if p in seen else "held out")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(f'"{p}"\n({kind})', rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"prompts against samples (w = {w}, DDIM {steps})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def autoencoder_quality(first_stage: tuple, test_images: np.ndarray, feat_fn, real_all: np.ndarray,
                        batch: int = 500) -> tuple[dict, np.ndarray]:
    """Reconstructions of test_images (uint8 [N, 28, 28]) through first_stage, the
    (model, variables, config, meta) of checkpoints.load_vae
    (posterior mean, quantised for vq, EMA parameters): MSE and PSNR on the [-1, 1] scale
    (peak-to-peak 2), reconstruction FID against the test set, and for vq the codebook's
    perplexity and share of codes used over the test set. Returns (metrics, uint8
    reconstructions [N, 28, 28])."""
    vae, variables, cfg, meta = first_stage  # as checkpoints.load_vae returns it
    recon_fn = jax.jit(lambda v, x: vae.apply(v, x, method=nets.VAE.reconstruct))
    x = data.to_float(test_images)
    sq_err, recons, codes = [], [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        r, info = recon_fn(variables, xb)
        r = np.clip(np.asarray(r), -1.0, 1.0)
        sq_err.append(np.mean(np.square(r - xb), axis=(1, 2, 3)))
        recons.append(data.to_uint8(r))
        if "index" in info:
            codes.append(np.asarray(info["index"]).ravel())
    mse = float(np.mean(np.concatenate(sq_err)))
    recons = np.concatenate(recons)
    ae = cfg.get("autoencoder") or {"reg": "kl"}
    out = dict(reg=ae["reg"], latent_shape=meta["latent_shape"], steps=meta["step"],
               perceptual_weight=cfg["loss"].get("perceptual_weight", 0.0),
               adversarial_weight=cfg["loss"].get("adversarial_weight", 0.0), mse=mse,
               psnr=float(10 * np.log10(4.0 / mse)),
               rfid=metrics.fid_from_features(real_all, feat_fn(recons)))
    if codes:
        usage = nets.codebook_usage(jnp.asarray(np.concatenate(codes)), ae["codebook_size"])
        out.update({k: float(v) for k, v in usage.items()}, codebook_size=ae["codebook_size"])
    print("vae: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                             if isinstance(v, float)), file=sys.stderr)
    if out["perceptual_weight"]:
        print(f"vae: note: {PERCEPTUAL_NOTE}", file=sys.stderr)
    return out, recons


# Decision: a perceptual loss on the FID classifier is allowed, and said beside
# every classifier number it flatters (prefer the Inception FID for such a VAE).
PERCEPTUAL_NOTE = ("this VAE was trained with a perceptual loss on the same classifier's "
                   "features that the classifier FID, rFID and PRDC use, which flatters them; "
                   "compare with --inception")
MATCHED = "pixel, LDM's U-Net"  # the cost row of the pixel model with the LDM's configuration


def run_benchmark(workdir: str, stage: str, what: str, preset: str) -> dict:
    """ldm_jax.benchmark in a fresh process (so its peak memory is this model's alone);
    stage MATCHED: the pixel model with the LDM's U-Net configuration."""
    which = ["--stage=pixel", "--matched"] if stage == MATCHED else [f"--stage={stage}"]
    r = subprocess.run([sys.executable, "-m", "ldm_jax.benchmark", f"--workdir={workdir}",
                        *which, f"--what={what}", f"--preset={preset}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark {stage}/{what} failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def training_summary(workdir: str, stage: str) -> dict:
    """Steps and wall-clock of the training run, from its metrics.jsonl."""
    path = os.path.join(workdir, stage, "metrics.jsonl")
    rows = []
    for line in open(path) if os.path.isfile(path) else []:
        try:  # a partly written last row (power lost) is skipped
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        return {}
    return dict(train_steps=rows[-1]["step"], train_wall_s=rows[-1]["time"],
                final_loss=rows[-1]["loss"])


# ----------------------------------------------------------------------------- Figures & report


def save_figures(samples: dict[str, np.ndarray], real: np.ndarray, cost: dict, out_dir: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    def grid(images, ncol=10):
        ncol = min(ncol, len(images))  # fewer than ncol samples: one row
        images = images[:ncol * ncol]
        rows = [np.concatenate(list(images[i:i + ncol]), axis=1)
                for i in range(0, len(images) - ncol + 1, ncol)]
        return np.concatenate(rows, axis=0)

    panels = [("MNIST test (real)", real)] + [(f"{s} samples", x) for s, x in samples.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for ax, (title, images) in zip(np.atleast_1d(axes), panels):
        ax.imshow(grid(images), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "samples.png"), dpi=100)
    plt.close(fig)
    if cost:
        save_cost_plot(cost, out_dir)


def save_cost_plot(cost: dict, out_dir: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    stages = list(cost)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar(stages, [cost[s]["train_s_per_iter"] for s in stages], color=[f"C{i}" for i in range(len(stages))])
    a1.set_ylabel("seconds per training iteration")
    a1.set_title("training (same batch size)")
    width = 0.8 / max(len(stages), 1)
    names = ("ddim10", "ddim50", "ddpm")
    for i, s in enumerate(stages):
        a2.bar(np.arange(3) + i * width, [cost[s][f"{n}_images_per_s"] for n in names], width,
               label=s)
    a2.set_xticks(np.arange(3) + width * (len(stages) - 1) / 2,
                  ["DDIM 10", "DDIM 50", "DDPM (all T)"])
    a2.set_yscale("log")
    a2.set_ylabel("images / s")
    a2.set_title("generation")
    a2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost.png"), dpi=100)
    plt.close(fig)


def save_guidance_plot(guidance: dict, out_dir: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(5, 4))
    for stage, rows in guidance.items():
        ws = list(rows)
        acc = [rows[w]["accuracy"] for w in ws]
        fid = [rows[w]["fid"] for w in ws]
        ax.plot(acc, fid, "o-", label=stage)
        for w, a, f in zip(ws, acc, fid):
            ax.annotate(f"w={w}", (a, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("conditional accuracy")
    ax.set_ylabel("FID (MNIST classifier features)")
    ax.set_title("classifier-free guidance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "guidance.png"), dpi=100)
    plt.close(fig)


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _quality_section(r: dict) -> list[str]:
    """The title line, the command, and the quality table with its notes."""
    lines = [f"# ldm_jax evaluation: {r['workdir']}", "",
             f"`{r['command']}` — {r['num']} samples per model, DDIM {r['ddim_steps']} steps "
             f"(eta {r.get('ddim_eta', 0.0):g}"
             + "".join(f"; {k} autoguidance {w:g}" for k, w in
                       (r.get("autoguidance") or {}).items() if w) + "), "
             f"device {r['device']}, {r['date']}.", "",
             "## Quality (MNIST-classifier features; FID against the 10,000 test images, "
             f"PRDC against {r['num']} test images)", "",
             "| | " + " | ".join(QUALITY + COVERAGE) +
             (" | Inception FID |" if r.get("inception") else " |"),
             "|---" * (len(QUALITY + COVERAGE) + 1 + bool(r.get("inception"))) + "|"]
    for name, q in r["quality"].items():
        inc = f" {_fmt(r['inception'].get(name))} |" if r.get("inception") else ""
        lines.append(f"| {name} | " + " | ".join(_fmt(q.get(k)) for k in QUALITY + COVERAGE)
                     + " |" + inc)
    lines += ["", "`real (train vs test)` is the floor: N training images scored as if they "
              "were samples. `recognisable`: the share of images whose top class probability "
              f"(committed classifier) exceeds {RECOGNISABLE}; `class_kl`: KL(test labels ‖ "
              "top classes of the images) in nats, 0 when every digit is drawn as often as in "
              "the test set (metrics.class_coverage; the histograms are in metrics.json).", ""]
    if (r.get("autoencoder") or {}).get("perceptual_weight") and "ldm" in r["quality"]:
        lines += [f"`ldm`: {PERCEPTUAL_NOTE}", ""]
    return lines


def _cost_section(cost: dict) -> list[str]:
    """The cost table of every benchmarked model, with how it was measured."""
    first = next(iter(cost.values()))
    lines = ["## Cost", "",
             "| | params | train s/iter | train compile s | DDIM-10 img/s | DDIM-50 img/s | "
             "DDPM img/s | DDPM compile s | peak RSS train MiB | peak RSS sample MiB | "
             "trained steps | train wall s |",
             "|---" * 12 + "|"]
    for s, c in cost.items():
        lines.append(
            f"| {s} | {_fmt(c['params'])} | {_fmt(c['train_s_per_iter'])} | "
            f"{_fmt(c['train_compile_s'])} | {_fmt(c['ddim10_images_per_s'])} | "
            f"{_fmt(c['ddim50_images_per_s'])} | {_fmt(c['ddpm_images_per_s'])} | "
            f"{_fmt(c['ddpm_compile_s'])} | {_fmt(c['train_peak_mib'])} | "
            f"{_fmt(c['generate_peak_mib'])} | {_fmt(c.get('train_steps'))} | "
            f"{_fmt(c.get('train_wall_s'))} |")
    return lines + ["", f"Train s/iter: median of the timed steps after compilation, batch "
                    f"{first['batch_size']}. Images/s: generation batch {first['gen_batch']}, "
                    "median over repeats after compilation, decoding included for the LDM." +
                    (f" `{MATCHED}` is the pixel model with the LDM's U-Net, diffusion and "
                     "optimizer configuration on 28x28x1 (untrained: cost does not depend on "
                     "the weights); its ratio to the `ldm` row is what the latent alone buys."
                     if MATCHED in cost else ""), ""]


def _autoencoder_section(a: dict) -> list[str]:
    """The first stage's reconstruction table (an Inception rFID column with --inception)."""
    inc_rfid = "inception_rfid" in a
    return ["## First stage (workdir/vae): reconstructions of the 10,000 test images", "",
            "| reg | latent | perceptual weight | adversarial weight | MSE | PSNR dB | rFID "
            "| perplexity | codes used |" + (" Inception rFID |" if inc_rfid else ""),
            "|---" * (9 + inc_rfid) + "|",
            f"| {a['reg']} | {'×'.join(map(str, a['latent_shape']))} | "
            f"{_fmt(a['perceptual_weight'])} | {_fmt(a.get('adversarial_weight', 0.0))} | "
            f"{a['mse']:.5f} | {a['psnr']:.2f} | "
            f"{_fmt(a['rfid'])} | {_fmt(a.get('perplexity'))} | {_fmt(a.get('codes_used'))} |"
            + (f" {_fmt(a['inception_rfid'])} |" if inc_rfid else ""),
            ""] + ([PERCEPTUAL_NOTE] if a["perceptual_weight"] else []) + (
            [f"Inception rFID: {a['inception_n']:,} test images against their "
             "reconstructions; the floor at that N is the Inception FID of "
             "`real (train vs test)` above."] if inc_rfid else []) + [
            "", "![reconstructions](reconstructions.png)", ""]


def _guidance_section(stage: str, rows: dict, num: int) -> list[str]:
    """The classifier-free guidance sweep of one class-conditional model."""
    lines = [f"## Classifier-free guidance ({stage})", "",
             "eps = (1 + w) eps(z, c) - w eps(z, null); "
             f"{num // 10} samples per digit for each w.", "",
             "| w | accuracy | " + " | ".join(QUALITY) + " |", "|---" * (len(QUALITY) + 2) + "|"]
    for w, row in rows.items():
        lines.append(f"| {w} | {row['accuracy']:.4f} | "
                     + " | ".join(_fmt(row[k]) for k in QUALITY) + " |")
    return lines + ["", "![guidance](guidance.png)", ""]


def _text_section(stage: str, rows: dict, num: int) -> list[str]:
    """The prompt sweep of one text-conditioned model."""
    lines = [f"## Text prompts ({stage})", "",
             "eps = (1 + w) eps(z, prompt) - w eps(z, \"\"); accuracy of the committed "
             f"classifier against the digit each prompt names; {num} seen and "
             f"{num} held-out prompts, {num // 20 * 10} \"7\"/\"seven\" pairs "
             "per w; FID, precision, recall and recognisable share of the seen-prompt "
             "samples.", "",
             "| w | seen | held out | words | numerals | \"7\" = \"seven\" | FID | "
             "recognisable | precision | recall |", "|---" * 10 + "|"]
    for w, row in rows.items():
        lines.append(f"| {w} | {row['seen']:.4f} | {row['held_out']:.4f} | "
                     f"{row['words']:.4f} | {row['numerals']:.4f} | "
                     f"{row['same_digit']:.4f} | {_fmt(row['fid'])} | "
                     f"{row['recognisable']:.3f} | {_fmt(row['precision'])} | "
                     f"{_fmt(row['recall'])} |")
    return lines + ["", "![prompts](prompts.png)", ""]


def write_report(result: dict, out_dir: str) -> str:
    """Writes out_dir/report.md from evaluate's result: quality, cost, the first stage and
    the guidance and prompt sweeps, each with its figure. Returns its path."""
    r = result
    lines = _quality_section(r)
    if r["cost"]:
        lines += _cost_section(r["cost"])
    lines += ["![samples](samples.png)", ""] + (["![cost](cost.png)", ""] if r["cost"] else [])
    if r.get("autoencoder"):
        lines += _autoencoder_section(r["autoencoder"])
    for stage, f in (r.get("few_step") or {}).items():
        lines += fewstep.section(stage, f["rows"], r["num"], f["inception"], _fmt)
        lines += [f"Training wall clock: {k} {_fmt(v.get('train_wall_s', float('nan')) / 60)} "
                  f"min ({_fmt(v.get('train_steps'))} steps)." for k, v in f["training"].items()]
        lines.append("")
    for stage, rows in (r.get("guidance") or {}).items():
        lines += _guidance_section(stage, rows, r["num"])
    for stage, rows in (r.get("text") or {}).items():
        lines += _text_section(stage, rows, r["num"])
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- Main


def _load_models(workdir: str, stages: list[str], step: int | None, autoguidance: float):
    """(first stage or None, {stage: Generator}), loaded before anything is written: an
    unfinished or foreign VAE fails here. With an LDM, the reconstructions are those of
    the VAE step it was trained on."""
    has_vae = os.path.isdir(os.path.join(workdir, "vae", "checkpoints"))
    vae_step = vae_digest = None
    if has_vae and "ldm" in stages:
        restored = checkpoints.load_checkpoint(os.path.join(workdir, "ldm"), step)
        vae_step = restored and restored[2].get("vae_step")
        vae_digest = restored and restored[2].get("vae_digest")
    first_stage = (checkpoints.load_vae(workdir, step=vae_step, digest=vae_digest)
                   if has_vae else None)
    gens = {s: sample.load_generator(workdir, s, step) for s in stages}  # fails before writing
    for gen in gens.values():  # a step at or before its guide: refused, not sampled unguided
        guide_step = gen.config.get("sample", {}).get("guide_step", 0)
        if autoguidance and guide_step and gen.step <= guide_step:
            sample.check_autoguidance(gen, autoguidance)
    return first_stage, gens


class _Reference:
    """What samples are scored against: the classifier's features of all test images, and
    N test and N training images (the real-vs-real floor), drawn at a fixed seed."""

    def __init__(self, classifier: str, num: int):
        self.feat_fn = features.feature_fn(classifier)
        self.real_all = reference_features(self.feat_fn, classifier)
        self.prob_fn = features.probabilities_fn(classifier)
        self.test_images, self.test_labels = data.load("package", "test")
        train_images, _ = data.load("package", "train")
        rng = np.random.default_rng(0)
        self.test_idx = rng.choice(len(self.test_images), min(num, len(self.test_images)),
                                   replace=False)
        self.test_n = self.test_images[self.test_idx]
        self.train_n = train_images[rng.choice(len(train_images), num, replace=False)]
        self.real_n = self.feat_fn(self.test_n)

    def score(self, images: np.ndarray) -> dict:
        """QUALITY and COVERAGE metrics of images [N, 28, 28]."""
        return dict(quality(self.real_all, self.real_n, self.feat_fn(images)),
                    **metrics.class_coverage(self.prob_fn(images), self.test_labels,
                                             RECOGNISABLE))


def _quality_samples(out_dir: str, s: str, gen, num: int, steps: int, eta: float,
                     autoguidance: float) -> tuple[np.ndarray, float]:
    """The quality samples of stage s and their autoguidance w (0 without a guide
    checkpoint): from the cache, or sampled and kept so a rerun skips this part."""
    guided = autoguidance if gen.guide_params is not None else 0.0
    if autoguidance and not guided:
        print(f"{s}: no guide checkpoint (sample.guide_step); sampled without "
              "autoguidance", file=sys.stderr)
    images = cached_samples(out_dir, gen, num, steps, eta, guided)
    if images is None:
        t = time.time()
        images = sample.generate(gen, num, jax.random.key(SAMPLE_SEED), "ddim", steps,
                                 eta=eta, autoguidance=guided)
        print(f"{s}: {num} samples in {time.time() - t:.0f}s", file=sys.stderr)
        save_samples(out_dir, gen, images, steps, eta, guided)
    return images, guided


def _sweeps(gens: dict, num: int, steps_of, ref: _Reference, classifier: str,
            out_dir: str) -> tuple[dict, dict]:
    """(guidance sweeps of class-conditional models, prompt sweeps of text ones)."""
    guidance, prompt_rows = {}, {}
    for s, gen in gens.items():
        if sample.is_text(gen):
            steps = steps_of(gen)
            prompt_rows[s] = prompt_sweep(gen, num, steps, ref.feat_fn, ref.prob_fn,
                                          ref.real_all, ref.real_n)
            save_prompt_figure(gen, steps, os.path.join(out_dir, "prompts.png"))
        elif sample.is_conditional(gen):
            guidance[s] = guidance_sweep(gen, num, steps_of(gen), ref.feat_fn,
                                         features.predict_fn(classifier), ref.real_all,
                                         ref.real_n)
    return guidance, prompt_rows


def _inception_fid(samples: dict, ref: _Reference, autoencoder: dict | None,
                   recons: np.ndarray | None) -> dict | None:
    """FID on InceptionV3 features against the N test images, per model and for the floor
    (and the first stage's rFID into autoencoder); None without the weights."""
    try:
        # Batches of 10 keep the CPU's memory low; an accelerator wants bigger ones.
        batch = 10 if jax.default_backend() == "cpu" else 250
        inc_fn = inception.make_feature_fn(inception.load_params(), batch_size=batch)
    except FileNotFoundError as e:
        print(f"evaluate: Inception FID skipped: {str(e).splitlines()[0]}", file=sys.stderr)
        return None
    real = inc_fn(ref.test_n)
    fids = {s: metrics.fid_from_features(real, inc_fn(x)) for s, x in samples.items()}
    fids["real (train vs test)"] = metrics.fid_from_features(real, inc_fn(ref.train_n))
    if autoencoder is not None:  # rFID: the same N test images, reconstructed
        autoencoder["inception_rfid"] = metrics.fid_from_features(
            real, inc_fn(recons[ref.test_idx]))
        autoencoder["inception_n"] = len(ref.test_idx)
    return fids


def _cost_rows(workdir: str, stages: list[str], preset: str) -> dict:
    """The train and generate benchmarks of each model, each in its own process. With an
    LDM, also the pixel model with the LDM's own U-Net: what the latent alone buys."""
    cost_rows = {}
    for s in stages + ([MATCHED] if "ldm" in stages else []):
        tr = run_benchmark(workdir, s, "train", preset)
        ge = run_benchmark(workdir, s, "generate", preset)
        cost_rows[s] = dict(tr, **{k: v for k, v in ge.items() if k not in ("what",)},
                            train_peak_mib=tr.get("device_peak_mib", tr["max_rss_mib"]),
                            generate_peak_mib=ge.get("device_peak_mib", ge["max_rss_mib"]),
                            **(training_summary(workdir, s) if s != MATCHED else {}))
        print(f"{s}: cost measured", file=sys.stderr)
    return cost_rows


def _few_step(workdir: str, students: list[str], num: int, ref: _Reference, out_dir: str,
              with_inception: bool) -> dict:
    """{student: {'rows', 'inception', 'training'}}: fewstep.few_step_rows, their Inception
    FID if asked, and the training minutes of teacher and student; and their figures."""
    out = {}
    for s in students:
        rows, samples = fewstep.few_step_rows(workdir, s, num, SAMPLE_SEED, ref.score)
        fewstep.save_grid(samples, os.path.join(out_dir, f"{s}_few_step.png"))
        inc = _inception_fid(samples, ref, None, None) if with_inception else None
        out[s] = dict(rows=rows, inception=inc, training={
            k: training_summary(workdir, k) for k in (configs.STUDENTS[s], s)})
        print(f"{s}: few-step rows measured", file=sys.stderr)
    return out


def evaluate(workdir: str, preset: str, num: int | None = None, ddim_steps: int | None = None,
             classifier: str | None = None, inception: bool = False, cost: bool = True,
             command: str = "", step: int | None = None, sweeps: bool = True,
             eta: float = 0.0, autoguidance: float = 0.0) -> dict:
    """eta is the DDIM eta of the quality samples (0: deterministic; 1: DDPM-like, which
    scored far better on an under-trained LDM, docs/results.md); the sweeps keep eta 0.
    autoguidance is w for each stage that kept a guide checkpoint (sample.guide_step);
    stages without one sample without it, and metrics.json records which did."""
    stages, students = trained_stages(workdir), fewstep.trained_students(workdir)
    if not stages and not os.path.isdir(os.path.join(workdir, "vae", "checkpoints")):
        raise configs.ConfigError(f"no trained vae, ldm or pixel model in {workdir}; train one "
                                  f"with `python -m ldm_jax.train --stage=vae --workdir={workdir}`")
    n_default, steps_default = PLAN[preset]
    num = num or n_default
    if num > configs.MNIST_TRAIN_IMAGES:
        raise cli.UsageError(f"--num={num} is more than the {configs.MNIST_TRAIN_IMAGES:,} "
                             "training images the real-vs-real floor draws")
    first_stage, gens = _load_models(workdir, stages, step, autoguidance)
    for s in students:  # a student whose teacher changed fails here, before writing
        fewstep.load_teacher_of(workdir, s)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    classifier = classifier or features.DEFAULT_PATH
    ref = _Reference(classifier, num)
    steps_of = lambda gen: min(ddim_steps or steps_default, gen.sched.num_timesteps)

    samples, q, guided = {}, {}, {}
    for s, gen in gens.items():
        samples[s], guided[s] = _quality_samples(out_dir, s, gen, num, steps_of(gen), eta,
                                                 autoguidance)
        q[s] = ref.score(samples[s])
    q["real (train vs test)"] = ref.score(ref.train_n)
    autoencoder = recons = None
    if first_stage is not None:
        autoencoder, recons = autoencoder_quality(first_stage, ref.test_images, ref.feat_fn,
                                                  ref.real_all)
        # Top row: test digits; bottom row: their reconstructions.
        sample.save_grid(np.concatenate([ref.test_images[:10], recons[:10]]),
                         os.path.join(out_dir, "reconstructions.png"), ncol=10)
    guidance, prompt_rows = _sweeps(gens if sweeps else {}, num, steps_of, ref, classifier,
                                    out_dir)
    inception_fid = _inception_fid(samples, ref, autoencoder, recons) if inception else None
    cost_rows = _cost_rows(workdir, stages, preset) if cost else {}
    few_step = _few_step(workdir, students, num, ref, out_dir, inception)

    result = dict(workdir=workdir, command=command, preset=preset, num=num,
                  ddim_steps=ddim_steps or steps_default, ddim_eta=float(eta),
                  autoguidance={s: float(w) for s, w in guided.items()},
                  device=jax.devices()[0].device_kind,
                  date=time.strftime("%Y-%m-%d"), quality=q, inception=inception_fid,
                  cost=cost_rows, few_step=few_step, guidance=guidance, text=prompt_rows,
                  autoencoder=autoencoder,
                  classifier=os.path.abspath(classifier))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    save_figures(samples, ref.test_n, cost_rows, out_dir)
    if guidance:
        save_guidance_plot(guidance, out_dir)
    write_report(result, out_dir)
    return result


def define_flags(fv) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("workdir", None, "Run directory with trained ldm and/or pixel stages.",
                        flag_values=fv)
    flags.DEFINE_string("preset", "cpu-quick", f"Sizes of the evaluation: {' | '.join(PLAN)} "
                        "(samples per model: " + ", ".join(f"{k} {v[0]}" for k, v in PLAN.items())
                        + ").", flag_values=fv)
    flags.DEFINE_integer("num", None, "Samples per model (default: from --preset).", flag_values=fv)
    flags.DEFINE_integer("steps", None, "DDIM steps of the quality samples (default: preset).",
                         flag_values=fv)
    flags.DEFINE_float("eta", 0.0, "DDIM eta of the quality samples in [0, 1]: 0 deterministic "
                       "(the default, as in docs/results.md unless it says otherwise), 1 "
                       "DDPM-like.", flag_values=fv)
    flags.DEFINE_float("autoguidance", 0.0, "Autoguidance w >= 0 of the quality samples, for "
                       "each model that kept a guide checkpoint (sample.guide_step); 0 (the "
                       "default) samples the model alone.", flag_values=fv)
    flags.DEFINE_string("classifier", None, "Feature classifier npz (default: the committed one).",
                        flag_values=fv)
    flags.DEFINE_bool("inception", False, "Also compute FID on InceptionV3 features (slow on CPU).",
                      flag_values=fv)
    flags.DEFINE_bool("cost", True, "Measure the cost benchmarks.", flag_values=fv)
    flags.DEFINE_bool("sweeps", True, "Conditional models: the guidance sweep (class labels) "
                      "or the prompt sweep (text); --nosweeps keeps only the unconditional "
                      "quality row.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step of the generators to evaluate "
                         "(default: the newest of each).", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    prog = "ldm_jax.evaluate"
    argv = argv or sys.argv
    fv = cli.parse_flags(prog, argv, define_flags)
    try:
        cli.require(fv, "workdir")
        if fv.preset not in PLAN:
            raise cli.UsageError(f"unknown preset {fv.preset!r}; choose one of {', '.join(PLAN)}")
        for name in ("num", "steps"):
            if fv[name].value is not None and fv[name].value <= 0:
                raise cli.UsageError(f"--{name} must be positive, got {fv[name].value}")
        try:  # the rules configs.validate applies to sample.*
            configs.check_eta(fv.eta, "--eta")
            configs.check_weight(fv.autoguidance, "--autoguidance")
        except configs.ConfigError as e:
            raise cli.UsageError(str(e)) from None
        if fv.num is not None and not MIN_NUM <= fv.num <= configs.MNIST_TRAIN_IMAGES:
            raise cli.UsageError(
                f"--num must be between {MIN_NUM} (density and coverage use 5 nearest "
                f"neighbours) and {configs.MNIST_TRAIN_IMAGES:,} (the training images the "
                f"real-vs-real floor draws), got {fv.num}")
        cli.check_workdir(fv.workdir, must_exist=True)
        cli.setup_jax()  # before anything starts a backend (the classifier's arrays would)
        features.load_classifier(fv.classifier)
        if fv.inception:  # a cut-off weights file fails now, not after the sampling
            inception.check_weights_file(inception.default_weights_path())
        command = "python -m ldm_jax.evaluate " + " ".join(argv[1:])
        result = evaluate(fv.workdir, fv.preset, fv.num, fv.steps, fv.classifier, fv.inception,
                          fv.cost, command, fv.step, fv.sweeps, fv.eta, fv.autoguidance)
    except (cli.UsageError, configs.ConfigError, data.DataError, features.ClassifierError,
            FileNotFoundError) as e:
        cli.fail(prog, e)
    except inception.InceptionWeightsError as e:
        cli.fail(prog, e)
    print(f"wrote {os.path.join(fv.workdir, 'eval', 'report.md')}", file=sys.stderr)
    for name, qs in result["quality"].items():
        print(f"  {name:>22}: " + "  ".join(f"{k}={qs[k]:.3f}" for k in QUALITY + COVERAGE),
              file=sys.stderr)


if __name__ == "__main__":
    main()
