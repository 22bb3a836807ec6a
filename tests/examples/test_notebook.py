"""examples/quickstart.ipynb runs top to bottom (small sizes)."""

import os

import nbformat
from nbclient import NotebookClient

from tests.helpers import ROOT


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    monkeypatch.setenv("QUICKSTART_STEPS", "2")
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "qwen2" in outputs and "tokens:" in outputs
    assert os.path.isfile(tmp_path / "run" / "curves.png")
    assert os.path.isfile(tmp_path / "run" / "metrics.jsonl")
