"""notebooks/colab.ipynb runs top to bottom at the smoke preset on 8 CPU devices (the
layout of a TPU v2-8 or v3-8), and the `full` preset splits over 1, 4 and 8 devices
(issue 30)."""

import os

import pytest

from conftest import ROOT
from ldm_jax import configs


@pytest.mark.parametrize("stage", ("vae",) + configs.DIFFUSION_STAGES)
def test_full_preset_batches_split_over_1_4_and_8_devices(stage):
    batch = configs.get_config(stage, "full").data.batch_size
    assert all(batch % n == 0 for n in (1, 4, 8)), (stage, batch)


@pytest.mark.slow  # several minutes on 2 cores: three stages, sampling, the evaluation
def test_colab_notebook_executes_at_smoke_on_8_devices(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient (the [test] extra) runs it")
    import nbformat  # pylint: disable=import-outside-toplevel  (installed with nbclient)
    workdir = tmp_path / "run"
    monkeypatch.setenv("LDM_JAX_COLAB_PRESET", "smoke")
    monkeypatch.setenv("LDM_JAX_COLAB_WORKDIR", str(workdir))
    monkeypatch.setenv("LDM_JAX_CPU_DEVICES", "8")
    # The cost benchmarks (six processes) took 9 of this test's 21 minutes on 2 busy cores;
    # test_evaluate.py covers them.
    monkeypatch.setenv("LDM_JAX_COLAB_COST", "0")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "colab.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    for i, cell in enumerate(nb.cells):  # each cell's time, shown with -s or on failure
        t = cell.get("metadata", {}).get("execution", {})
        if "iopub.status.busy" in t and "shell.execute_reply" in t:
            from datetime import datetime  # pylint: disable=import-outside-toplevel
            seconds = (datetime.fromisoformat(t["shell.execute_reply"].rstrip("Z")) -
                       datetime.fromisoformat(t["iopub.status.busy"].rstrip("Z"))).total_seconds()
            print(f"cell {i}: {seconds:.0f}s {cell.source.splitlines()[0][:60]}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend cpu, 8 device(s)" in text and "preset smoke" in text, text
    assert not (tmp_path / "ldm_jax_repo").exists()  # importable: nothing cloned or installed
    for name in ("ldm_samples.png", "pixel_samples.png", "eval/report.md", "eval/metrics.json",
                 "eval/samples.png"):
        assert (workdir / name).is_file(), name
    assert "pixel" in (workdir / "eval" / "report.md").read_text()
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4, len(pngs)  # two grids, the evaluation's samples, the curves
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the report
