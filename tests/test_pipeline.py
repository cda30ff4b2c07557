"""The README's main command, on the smoke preset: VAE -> LDM -> grid, and its bad input."""

import pytest
import numpy as np

from conftest import run_module


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_pipeline_smoke_writes_grid_and_resumes(tmp_path):
    r = run_module("pipeline", f"--workdir={tmp_path}", "--preset=smoke", "--num=8")
    assert r.returncode == 0, r.stderr[-1500:]
    with np.load(tmp_path / "ldm_samples.npz", allow_pickle=False) as z:
        assert z["images"].shape == (8, 28, 28) and z["images"].dtype == np.uint8
    assert (tmp_path / "ldm_samples.png").stat().st_size > 0
    assert (tmp_path / "vae" / "checkpoints").is_dir() and not (tmp_path / "pixel").exists()
    # Rerunning the same command finds finished stages and only samples again.
    r = run_module("pipeline", f"--workdir={tmp_path}", "--preset=smoke", "--num=8")
    assert r.returncode == 0 and "ldm: finished" not in r.stderr, r.stderr[-1500:]


def test_pipeline_bad_stage_exits_2(tmp_path):
    r = run_module("pipeline", f"--workdir={tmp_path / 'w'}", "--stages=vae,gan")
    assert r.returncode == 2 and "unknown stage 'gan' in --stages" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
