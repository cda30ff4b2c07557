"""Classifier FID and recognisable share of one trained generator under several samplers:
docs/results.md, "Autoguidance, guides and samplers" (its line on stochastic sampling).

    python scripts/sampler_sweep.py --workdir=W --num=N --samplers=SAMPLER:STEPS:ETA,... [--stage=pixel]
    python scripts/sampler_sweep.py --workdir=runs/demo --num=2000 --samplers=ddim:50:0,ddim:50:1,dpmpp2m:20:0

One JSON line per sampler; the samples are drawn with the seed evaluate uses, so DDIM with
eta 0 at evaluate's steps reproduces evaluate's FID.
"""
import json
import time

import jax
from absl import app, flags

from ldm_jax import cli, configs, evaluate, features, sample, score

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the generator.")
flags.DEFINE_integer("num", None, "Samples per sampler.")
flags.DEFINE_list("samplers", None, "SAMPLER:STEPS:ETA triples, SAMPLER one of "
                  f"{', '.join(configs.SAMPLERS)}; e.g. ddim:50:1,dpmpp2m:20:0.")
flags.DEFINE_enum("stage", "ldm", list(configs.DIFFUSION_STAGES), "The generator's stage.")
for _name in ("workdir", "num", "samplers"):
    flags.mark_flag_as_required(_name)


def parse_samplers(specs: list[str]) -> list[tuple[str, int, float]]:
    """'ddim:50:1' -> ('ddim', 50, 1.0), checked against the samplers sample knows."""
    out = []
    for spec in specs:
        name, steps, eta = spec.split(":") if spec.count(":") == 2 else (None, 0, 0)
        if name not in configs.SAMPLERS:
            raise app.UsageError(f"--samplers: {spec!r} is not SAMPLER:STEPS:ETA with SAMPLER "
                                 f"one of {', '.join(configs.SAMPLERS)}")
        out.append((name, int(steps), float(eta)))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    specs = parse_samplers(FLAGS.samplers)
    cli.setup_jax()
    ref = score.Reference(features.DEFAULT_PATH, FLAGS.num)
    gen = sample.load_generator(FLAGS.workdir, FLAGS.stage)
    for name, steps, eta in specs:
        t = time.time()
        x = sample.generate(gen, FLAGS.num, jax.random.key(evaluate.SAMPLE_SEED), name, steps,
                            eta=eta, progress=False)
        print(json.dumps(dict(workdir=FLAGS.workdir, stage=FLAGS.stage, step=gen.step,
                              sampler=name, steps=steps, eta=eta, num=FLAGS.num,
                              **ref.score(x), sample_s=time.time() - t)), flush=True)


if __name__ == "__main__":
    app.run(main)
