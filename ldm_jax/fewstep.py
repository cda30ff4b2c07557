"""The few-step rows of `evaluate`: each distilled student at 1, 2, 4 and 8 steps beside its
teacher's default sampler, at the same N, seed and features, with images/s and U-Net calls
per image; and the figure of their samples.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import jax
import numpy as np

from ldm_jax import checkpoints, cli, configs, data, sample

STEPS = (1, 2, 4, 8)
TEACHER = "teacher"  # the row of the teacher's default sampler


def trained_students(workdir: str) -> list[str]:
    return [s for s in configs.STUDENTS if os.path.isdir(os.path.join(workdir, s, "checkpoints"))]


def unet_calls(gen: sample.Generator, sampler: str, steps: int, autoguidance: float) -> int:
    """U-Net evaluations per image: a step each (a student's, or the teacher's sampler's),
    doubled by autoguidance and again by classifier-free guidance (a doubled batch)."""
    if sample.is_student(gen):
        return steps
    calls = gen.sched.num_timesteps if sampler == "ddpm" else steps
    return calls * (2 if autoguidance > 0 else 1) * (2 if sample.is_conditional(gen) else 1)


def timed_generate(gen: sample.Generator, num: int, seed: int, sampler: str, steps: int,
                   eta: float = 0.0, autoguidance: float = 0.0,
                   batch: int = 256) -> tuple[np.ndarray, float]:
    """(uint8 [num, 28, 28], seconds): the same batches as sample.generate, compiled ahead
    of the clock, so the seconds are sampling and decoding only."""
    batch = min(batch, num)
    run = sample.sample_fn(gen, batch, sampler, steps, eta, autoguidance=autoguidance)
    key = jax.random.key(seed)
    compiled = run.run.lower(*run.run_args(key)).compile()
    out, t = [], time.perf_counter()
    for i in range(math.ceil(num / batch)):
        out.append(data.to_uint8(np.asarray(compiled(*run.run_args(jax.random.fold_in(key, i))))))
    return np.concatenate(out)[:num], time.perf_counter() - t


def settings(workdir: str, student: str, teacher: sample.Generator,
             step: int | None = None) -> list[tuple]:
    """(row name, generator, sampler, steps, eta, autoguidance) of the teacher's default
    sampler and of the student (at checkpoint `step`; default the newest) at each of STEPS
    it can take."""
    s = teacher.config["sample"]
    w = s.get("guide_weight", 0.0) if teacher.guide_params is not None else 0.0
    gen = sample.load_student(workdir, student, step, teacher)
    rows = [(TEACHER, teacher, s.get("sampler", "ddim"), s["steps"], s.get("eta", 0.0), w)]
    w_student = gen.config["sample"]["weight"]  # 0 unless it takes autoguidance's weight
    return rows + [(f"{k} step{'s' * (k > 1)}", gen, "consistency", k, 0.0, w_student)
                   for k in STEPS if k <= gen.config["distill"]["intervals"]]


def load_teacher_of(workdir: str, student: str) -> sample.Generator:
    """The teacher checkpoint the student was distilled from (refused if it changed)."""
    meta = checkpoints.stored_meta(os.path.join(workdir, student))
    return sample.load_generator(workdir, configs.STUDENTS[student],
                                 checkpoints.check_teacher(workdir, student, meta))


def few_step_rows(workdir: str, student: str, teacher: sample.Generator, num: int, seed: int,
                  score: Callable[[np.ndarray], dict]) -> tuple[dict, dict]:
    """({row: metrics}, {row: samples}) for one student and its teacher (load_teacher_of);
    each row's metrics are score(samples) plus images/s, U-Net calls per image and its
    sampler."""
    rows, samples = {}, {}
    for name, gen, sampler, steps, eta, w in settings(workdir, student, teacher):
        images, seconds = timed_generate(gen, num, seed, sampler, steps, eta, w)
        samples[name] = images
        rows[name] = dict(score(images), images_per_s=num / seconds, seconds=seconds,
                          unet_calls=unet_calls(gen, sampler, steps, w), sampler=sampler,
                          steps=steps, eta=eta, autoguidance=w)
    return rows, samples


def save_grid(samples: dict[str, np.ndarray], path: str, per_row: int = 10) -> None:
    """One row of per_row samples for each row of the table (teacher first)."""
    rows = np.concatenate([x[:per_row] for x in samples.values()])
    with cli.atomic_output(path) as f:
        sample.save_grid(rows, f, ncol=per_row)
