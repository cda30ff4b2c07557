"""notebooks/explore.ipynb runs top to bottom, headless, on the smoke workdir."""

import os

import pytest

from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason="nbclient (the [test] extra) runs the notebook")
import nbformat  # noqa: E402  (installed with nbclient)


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_explore_notebook_executes(smoke_workdir, text_workdir, monkeypatch):
    monkeypatch.setenv("LDM_JAX_WORKDIR", smoke_workdir)  # absolute: os.path.join keeps it
    monkeypatch.setenv("LDM_JAX_TEXT_WORKDIR", text_workdir)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "explore.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    # forward (pixel + latent), 2 trajectories, samples, reconstructions, PCA, prompt
    # samples, cross-attention maps
    assert len(pngs) >= 9, len(pngs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "PSNR" in text and "stages: ['ldm', 'pixel']" in text
    assert "4 cross-attention blocks at 4x4; latent 7x7; prompt 'a handwritten seven'" in text
