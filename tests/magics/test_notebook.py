"""The `%%glm` + routing views notebook runs top to bottom in a real kernel (nbclient) on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "glm_magic_and_routing.ipynb"


def test_magic_and_views_notebook_runs(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("GLM_WORKBENCH_MODEL", str(tiny_checkpoint))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    text = lambda i: "".join(o.get("text", "") for o in outputs[i])
    sources = {i: notebook.cells[i].source for i in outputs}
    find = lambda start: next(i for i, s in sources.items() if s.startswith(start))
    assert "the local engine in this kernel" in text(find("%glm status"))
    assert "put into a new cell below" in text(find("%%glm --max-tokens 32"))
    # --trace put the routing view under the second answer; the views render as plotly figures.
    traced = outputs[find("%%glm --max-tokens 16")]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in traced)
    assert "[2] you: Now explain it" in text(find("%glm history"))
    for start in ("widgets.load_heatmap", "widgets.coactivation_heatmap", "widgets.expert_card", "again ="):
        assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs[find(start)]), start
    assert "agreement per layer: [" in text(find("again ="))
