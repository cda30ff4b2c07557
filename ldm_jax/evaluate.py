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

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from ldm_jax import (checkpoints, cli, configs, data, features, fewstep, inception, metrics, report,
                     sample, score, text)
from ldm_jax.score import COVERAGE, QUALITY, Reference, autoencoder_quality, quality

# Per preset: (samples per model, DDIM steps for the quality samples).
PLAN = {"smoke": (128, 5), "cpu-quick": (2000, 50), "full": (10_000, 100)}
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
TEXT_GUIDANCE = (0.0, 1.0, 2.0, 4.0)
FIGURE_W = 2.0  # guidance of prompts.png
FIGURE_PROMPTS = ("7", "seven", "a handwritten 3", "number four, written by hand",
                  "the handwritten number 5", "a drawing of an eight", "picture of digit 0", "")
MIN_NUM = 6  # PRDC's k = 5 nearest neighbours need at least 6 samples
SAMPLE_SEED = 1  # jax.random.key of the quality samples


def trained_stages(workdir: str) -> list[str]:
    return [s for s in configs.DIFFUSION_STAGES
            if os.path.isdir(os.path.join(workdir, s, "checkpoints"))]


def _guide_min_t(gen, autoguidance: float) -> int:
    """Where the samples' guidance starts: the generator's t, or 0 when unguided."""
    return gen.guide_min_t if autoguidance else 0


def _eta_min_t(gen, eta: float) -> int:
    """Where the samples' fresh noise stops: the generator's t, or 0 when eta is 0."""
    return gen.eta_min_t if eta else 0


def _sampling_record(gens: dict, guided: dict, eta: float) -> dict:
    """metrics.json's record of how each stage's quality samples were guided and noised."""
    return dict(autoguidance={s: float(w) for s, w in guided.items()},
                guide_min_t={s: _guide_min_t(gens[s], w) for s, w in guided.items() if w},
                eta_min_t={s: _eta_min_t(g, eta) for s, g in gens.items() if eta})


def save_samples(out_dir: str, gen, images: np.ndarray, steps: int, eta: float = 0.0,
                 autoguidance: float = 0.0) -> None:
    """The quality samples, with what they were drawn from (see cached_samples), written
    under a unique temporary name and renamed (a kill mid-write leaves the old file)."""
    with cli.atomic_output(os.path.join(out_dir, f"{gen.stage}_samples.npz")) as f:
        np.savez_compressed(f, images=images, identity=np.array(gen.identity),
                            model_step=gen.step, sampler="ddim", ddim_steps=steps,
                            ddim_eta=float(eta), seed=SAMPLE_SEED, autoguidance=float(autoguidance),
                            guide_min_t=_guide_min_t(gen, autoguidance),
                            eta_min_t=_eta_min_t(gen, eta))


def cached_samples(out_dir: str, gen, num: int, steps: int, eta: float = 0.0,
                   autoguidance: float = 0.0) -> np.ndarray | None:
    """Samples an earlier evaluate run saved for these very weights (gen.identity, the
    digest of the parameters that sample), sampler, steps, eta, autoguidance, seed and size,
    else None. A file without an identity or an eta (written before they were recorded) is
    never reused; one without an autoguidance weight was drawn without it (w = 0), one
    without guide_min_t guided at every step, one without eta_min_t took eta at every step."""
    path = os.path.join(out_dir, f"{gen.stage}_samples.npz")
    if not os.path.isfile(path) or not gen.identity:
        return None
    want = dict(identity=gen.identity, sampler="ddim", ddim_steps=steps, ddim_eta=float(eta),
                seed=SAMPLE_SEED)
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_w = z["autoguidance"].item() if "autoguidance" in z.files else 0.0
            min_t = z["guide_min_t"].item() if "guide_min_t" in z.files else 0
            eta_min_t = z["eta_min_t"].item() if "eta_min_t" in z.files else 0
            if (all(k in z.files for k in want) and "images" in z.files
                    and stored_w == float(autoguidance)
                    and min_t == _guide_min_t(gen, autoguidance)
                    and eta_min_t == _eta_min_t(gen, eta)
                    and all(z[k].item() == v for k, v in want.items())
                    and len(z["images"]) == num):
                print(f"{gen.stage}: reusing {num} samples from {path}", file=sys.stderr)
                return z["images"]
    except score.UNREADABLE:  # unreadable (cut off, garbled): sample again and overwrite it
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



def run_benchmark(workdir: str, stage: str, what: str, preset: str) -> dict:
    """ldm_jax.benchmark in a fresh process (so its peak memory is this model's alone);
    stage MATCHED: the pixel model with the LDM's U-Net configuration."""
    which = ["--stage=pixel", "--matched"] if stage == report.MATCHED else [f"--stage={stage}"]
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


def _sweeps(gens: dict, num: int, steps_of, ref: Reference, classifier: str,
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


def _inception_fid(samples: dict, ref: Reference, autoencoder: dict | None,
                   recons: np.ndarray | None) -> dict | None:
    """Inception FID per model and for the floor (score.Reference.inception_fid), and the
    first stage's rFID on the same N test images, reconstructed, into autoencoder."""
    with_recons = dict(samples, **({"first stage": recons[ref.test_idx]}
                                   if autoencoder is not None else {}))
    fids = ref.inception_fid(with_recons)
    if fids is not None and autoencoder is not None:
        autoencoder["inception_rfid"] = fids.pop("first stage")
        autoencoder["inception_n"] = len(ref.test_idx)
    return fids


def _cost_rows(workdir: str, stages: list[str], preset: str) -> dict:
    """The train and generate benchmarks of each model, each in its own process. With an
    LDM, also the pixel model with the LDM's own U-Net: what the latent alone buys."""
    cost_rows = {}
    for s in stages + ([report.MATCHED] if "ldm" in stages else []):
        tr = run_benchmark(workdir, s, "train", preset)
        ge = run_benchmark(workdir, s, "generate", preset)
        cost_rows[s] = dict(tr, **{k: v for k, v in ge.items() if k not in ("what",)},
                            train_peak_mib=tr.get("device_peak_mib", tr["max_rss_mib"]),
                            generate_peak_mib=ge.get("device_peak_mib", ge["max_rss_mib"]),
                            **(training_summary(workdir, s) if s != report.MATCHED else {}))
        print(f"{s}: cost measured", file=sys.stderr)
    return cost_rows


def _few_step(workdir: str, teachers: dict, num: int, ref: Reference, out_dir: str,
              with_inception: bool) -> dict:
    """{student: {'rows', 'inception', 'training'}}: fewstep.few_step_rows, their Inception
    FID if asked, and the training minutes of teacher and student; and their figures."""
    out = {}
    for s, teacher in teachers.items():
        rows, samples = fewstep.few_step_rows(workdir, s, teacher, num, SAMPLE_SEED, ref.score)
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
    out_dir = os.path.join(workdir, "eval")
    check_out_dir(out_dir, stages, students)
    n_default, steps_default = PLAN[preset]
    num = num or n_default
    if num > configs.MNIST_TRAIN_IMAGES:
        raise cli.UsageError(f"--num={num} is more than the {configs.MNIST_TRAIN_IMAGES:,} "
                             "training images the real-vs-real floor draws")
    first_stage, gens = _load_models(workdir, stages, step, autoguidance)
    # A student whose teacher changed fails here, before writing.
    teachers = {s: fewstep.load_teacher_of(workdir, s) for s in students}
    os.makedirs(out_dir, exist_ok=True)
    classifier = classifier or features.DEFAULT_PATH
    ref = Reference(classifier, num)
    steps_of = lambda gen: min(ddim_steps or steps_default, gen.sched.num_timesteps)

    samples, q, guided = {}, {}, {}
    for s, gen in gens.items():
        samples[s], guided[s] = _quality_samples(out_dir, s, gen, num, steps_of(gen), eta,
                                                 autoguidance)
        q[s] = ref.score(samples[s])
    q[score.FLOOR] = ref.score(ref.train_n)
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
    few_step = _few_step(workdir, teachers, num, ref, out_dir, inception)

    result = dict(workdir=workdir, command=command, preset=preset, num=num,
                  ddim_steps=ddim_steps or steps_default, ddim_eta=float(eta),
                  **_sampling_record(gens, guided, eta), device=jax.devices()[0].device_kind,
                  date=time.strftime("%Y-%m-%d"), quality=q, inception=inception_fid,
                  cost=cost_rows, few_step=few_step, guidance=guidance, text=prompt_rows,
                  autoencoder=autoencoder, classifier=os.path.abspath(classifier))
    report.save_figures(samples, ref.test_n, cost_rows, out_dir)
    if guidance:
        report.save_guidance_plot(guidance, out_dir)
    report.write_report(result, out_dir)
    with cli.atomic_output(os.path.join(out_dir, "metrics.json")) as f:  # last: its report is in
        f.write(json.dumps(result, indent=2).encode())
    return result


# What evaluate writes in workdir/eval, besides <stage>_samples.npz and <student>_few_step.png.
OUTPUTS = ("metrics.json", "report.md", "samples.png", "cost.png", "guidance.png",
           "prompts.png", "reconstructions.png")


def check_out_dir(out_dir: str, stages: list[str], students: list[str]) -> None:
    """One line, before any sampling, unless evaluate can write its outputs in out_dir."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise cli.UsageError(f"{out_dir} is a file; evaluate writes its outputs in that "
                             "directory: move it away")
    names = OUTPUTS + tuple(f"{s}_samples.npz" for s in stages) + tuple(
        f"{s}_few_step.png" for s in students)
    for path in (os.path.join(out_dir, name) for name in names):
        if os.path.isdir(path):
            raise cli.UsageError(f"{path}, which evaluate writes, is a directory; move it away")
    if os.path.isdir(out_dir) and (why := cli.unwritable_reason(out_dir)):
        raise cli.UsageError(f"{out_dir} is not writable ({why})")


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
    with cli.sigterm_as_interrupt():  # SIGTERM: the one line Ctrl-C prints
        _main(argv)


def _main(argv: list[str] | None) -> None:
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
        if fv.inception:  # missing or cut-off weights fail now, not after the sampling
            inception.check_weights_file(inception.default_weights_path())
        command = "python -m ldm_jax.evaluate " + " ".join(argv[1:])
        result = evaluate(fv.workdir, fv.preset, fv.num, fv.steps, fv.classifier, fv.inception,
                          fv.cost, command, fv.step, fv.sweeps, fv.eta, fv.autoguidance)
    except (cli.UsageError, configs.ConfigError, data.DataError, features.ClassifierError,
            FileNotFoundError) as e:
        cli.fail(prog, e)
    except inception.InceptionWeightsError as e:
        cli.fail(prog, e)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (cli.sigterm_as_interrupt)
        print(f"{prog}: interrupted; any metrics.json in {fv.workdir}/eval is from a run "
              "that finished", file=sys.stderr)
        sys.exit(cli.interrupted_status(e))
    print(f"wrote {os.path.join(fv.workdir, 'eval', 'report.md')}", file=sys.stderr)
    for name, qs in result["quality"].items():
        print(f"  {name:>22}: " + "  ".join(f"{k}={qs[k]:.3f}" for k in QUALITY + COVERAGE),
              file=sys.stderr)


if __name__ == "__main__":
    main()
