"""notebooks/quickstart.ipynb executed top to bottom in a real kernel (nbclient), with few steps, writing only into
tmp_path: it trains, the loss falls, it plots, writes a story and matches transformers' logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, checkout_env

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
STEPS = 20  # enough for the loss to fall by several nats; the whole notebook then runs in well under 2 minutes
PROMPT = "Once upon a time"


def run_notebook(nb, cwd: Path, out: Path):
    """Execute `nb` in place in a kernel started in `cwd`, its outputs going to `out`."""
    for module in ("nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is missing; it comes with the dev extra: pip install -e '.[dev]'")
    from nbclient import NotebookClient

    env = {k: v for k, v in checkout_env().items() if k != "MLFLOW_TRACKING_URI"}
    env.update(DIST_LM_QUICKSTART_STEPS=str(STEPS), DIST_LM_QUICKSTART_DIR=str(out), PYTHONUNBUFFERED="1")
    # kernel "python3" with argv "python" runs this interpreter (jupyter_client substitutes sys.executable)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def read_notebook():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is missing; it comes with the dev extra: "
                                                      "pip install -e '.[dev]'")
    return nbformat.read(NOTEBOOK, as_version=4)


def stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_notebook_is_saved_without_outputs():
    # Outputs in the repository would be stale the moment the code changes, and bloat every diff.
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_quickstart_runs_top_to_bottom(tmp_path):
    out = tmp_path / "out"
    notebooks_before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    nb = run_notebook(read_notebook(), NOTEBOOK.parent, out)  # as Jupyter starts it: in notebooks/
    cells = {c.id: c for c in nb.cells}

    assert f"repository: {ROOT}" in stdout(cells["settings"])
    losses = [r["train/loss"] for r in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 1.0, losses
    assert (out / "run" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors").is_file()

    assert (out / "loss.png").stat().st_size > 10_000
    assert any("image/png" in o.get("data", {}) for o in cells["loss-curve"].outputs)

    story = stdout(cells["generate"])
    assert story.startswith(PROMPT) and len(story.strip()) > len(PROMPT), story

    match = re.search(r"logits match: largest difference (\S+) over \d+ tokens", stdout(cells["transformers"]))
    assert match and float(match.group(1)) < 1e-4, stdout(cells["transformers"])

    # Everything went to DIST_LM_QUICKSTART_DIR (MLflow's store and artifacts included), nothing into the checkout.
    assert {"run", "data", "hf", "mlflow.db", "mlruns", "loss.png"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == notebooks_before


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_settings_find_the_checkout_from_anywhere(tmp_path, where):
    # From the repository root, and from a directory outside it (found through the imported dist_lm);
    # the full run above starts in notebooks/.
    nb = read_notebook()
    nb.cells = [c for c in nb.cells if c.id == "settings"]
    cwd = ROOT if where == "root" else tmp_path
    run_notebook(nb, cwd, tmp_path / "out")
    text = stdout(nb.cells[0])
    assert f"repository: {ROOT}" in text and f"outputs:    {(tmp_path / 'out').resolve()}" in text, text
    assert (tmp_path / "out").is_dir()
