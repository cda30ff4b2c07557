"""evaluate's figures and its markdown report, written from the result dict alone (so a
metrics.json from any run can be drawn again): samples.png, cost.png, guidance.png, report.md.
"""

from __future__ import annotations

import os

import numpy as np

from ldm_jax import cli, fewstep, score
from ldm_jax.score import COVERAGE, PERCEPTUAL_NOTE, PIXELS, QUALITY, RECOGNISABLE

PIXEL_HEADS = ("exact 0", "1–15", "> 250")  # the columns of PIXELS
MATCHED = "pixel, LDM's U-Net"  # the cost row of the pixel model with the LDM's configuration

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


def _share(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _quality_section(r: dict) -> list[str]:
    """The title line, the command, and the quality table with its notes."""
    lines = [f"# ldm_jax evaluation: {r['workdir']}", "",
             f"`{r['command']}` — {r['num']} samples per model, DDIM {r['ddim_steps']} steps "
             f"(eta {r.get('ddim_eta', 0.0):g}"
             + "".join(f"; {k} autoguidance {w:g}" for k, w in
                       (r.get("autoguidance") or {}).items() if w)
             + "".join(f"; {k} eta only from t = {m}" for k, m in
                       (r.get("eta_min_t") or {}).items() if m) + "), "
             f"device {r['device']}, {r['date']}.", "",
             "## Quality (MNIST-classifier features; FID against the 10,000 test images, "
             f"PRDC against {r['num']} test images)", "",
             "| | " + " | ".join(QUALITY + COVERAGE + PIXEL_HEADS) +
             (" | Inception FID |" if r.get("inception") else " |"),
             "|---" * (len(QUALITY + COVERAGE + PIXELS) + 1 + bool(r.get("inception"))) + "|"]
    for name, q in r["quality"].items():
        inc = f" {_fmt(r['inception'].get(name))} |" if r.get("inception") else ""
        lines.append(f"| {name} | " + " | ".join(_fmt(q.get(k)) for k in QUALITY + COVERAGE)
                     + " | " + " | ".join(_share(q.get(k)) for k in PIXELS) + " |" + inc)
    lines += ["", f"`{score.FLOOR}` is the floor: N training images scored as if they "
              "were samples. `recognisable`: the share of images whose top class probability "
              f"(committed classifier) exceeds {RECOGNISABLE}; `class_kl`: KL(test labels ‖ "
              "top classes of the images) in nats, 0 when every digit is drawn as often as in "
              "the test set (metrics.class_coverage; the histograms are in metrics.json). "
              "The last three columns are shares of pixels: exactly 0, in 1–15 (a faint haze "
              "that Inception features weigh heavily) and above 250 (saturated strokes).", ""]
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
            "| perplexity | codes used | " + " | ".join(PIXEL_HEADS) + " |"
            + (" Inception rFID |" if inc_rfid else ""),
            "|---" * (9 + len(PIXELS) + inc_rfid) + "|",
            f"| {a['reg']} | {'×'.join(map(str, a['latent_shape']))} | "
            f"{_fmt(a['perceptual_weight'])} | {_fmt(a.get('adversarial_weight', 0.0))} | "
            f"{a['mse']:.5f} | {a['psnr']:.2f} | "
            f"{_fmt(a['rfid'])} | {_fmt(a.get('perplexity'))} | {_fmt(a.get('codes_used'))} | "
            + " | ".join(_share(a.get(k)) for k in PIXELS) + " |"
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


def _few_step_section(student: str, rows: dict, num: int, inception: dict | None) -> list[str]:
    """The report's few-step table of one student."""
    inc = inception is not None
    lines = [f"## Few-step sampling ({student}, distilled from its teacher)", "",
             f"{num} samples per row, the quality table's features. U-Net calls per image "
             "count guidance passes; images/s excludes compilation. Rows top to bottom are "
             f"the rows of `{student}_few_step.png`.", "",
             "| sampler | U-Net calls | images/s | FID | precision | recall | recognisable | "
             "class_kl |" + (" Inception FID |" if inc else ""), "|---" * (8 + inc) + "|"]
    for name, r in rows.items():
        label = (f"teacher: {r['sampler']}-{r['steps']}, eta {r['eta']:g}, autoguidance "
                 f"{r['autoguidance']:g}" if name == fewstep.TEACHER else f"student, {name}")
        lines.append(f"| {label} | {r['unet_calls']} | {_fmt(r['images_per_s'])} | "
                     + " | ".join(_fmt(r[k]) for k in ("fid", "precision", "recall",
                                                       "recognisable", "class_kl"))
                     + " |" + (f" {_fmt(inception.get(name))} |" if inc else ""))
    return lines + ["", f"![few-step samples]({student}_few_step.png)", ""]


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
        lines += _few_step_section(stage, f["rows"], r["num"], f["inception"])
        lines += [f"Training wall clock: {k} {_fmt(v.get('train_wall_s', float('nan')) / 60)} "
                  f"min ({_fmt(v.get('train_steps'))} steps)." for k, v in f["training"].items()]
        lines.append("")
    for stage, rows in (r.get("guidance") or {}).items():
        lines += _guidance_section(stage, rows, r["num"])
    for stage, rows in (r.get("text") or {}).items():
        lines += _text_section(stage, rows, r["num"])
    path = os.path.join(out_dir, "report.md")
    with cli.atomic_output(path) as f:  # an interrupt keeps the old report whole
        f.write("\n".join(lines).encode())
    return path
