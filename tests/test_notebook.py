"""examples/analysis.ipynb runs, top to bottom, on a tiny experiment, and shows what it says.

The experiment is ``experiments/smoke.yaml`` swept into the docs examples' scratch directory
(``tests/test_docs.py``: whichever test runs first trains it, the other finds it done); the
notebook reads it through ``KLPPO_RESULTS`` and runs from ``examples/`` as a user's Jupyter
would, with nbclient on a fresh kernel.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import scipy.stats

from tests.test_docs import ROOT, example_env, example_workdir

NOTEBOOK = ROOT / "examples" / "analysis.ipynb"


def _cell(nb, needle: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    return cell


def _text(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def _has_image(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.outputs)


def test_analysis_notebook_runs_on_a_tiny_experiment(tmp_path_factory, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    import klppo_bench as kb

    work = example_workdir(tmp_path_factory.getbasetemp())
    sweep = subprocess.run(["klppo-bench", "sweep", "experiments/smoke.yaml"], cwd=work,
                           env=example_env(), capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    results = work / "results" / "smoke"
    monkeypatch.setenv("KLPPO_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    runs = kb.load_runs(results, states=("done",))
    assert len(runs) == 4
    assert f"{len(runs)} of {len(runs)} runs done" in _text(_cell(nb, "kb.load_runs("))

    # the rliable cell: IQM per setting (rliable's point estimate is the 25% trimmed mean of
    # the setting's final scores) inside its own 95% interval
    rows = {m.group(1): [float(x) for x in m.group(2, 3, 4)] for m in re.finditer(
        r"^(\S+)\s+(-?[\d.]+(?:e[-+]\d+)?)\s+(-?[\d.]+(?:e[-+]\d+)?)\s+(-?[\d.]+(?:e[-+]\d+)?)\s*$",
        _text(_cell(nb, "rly.get_interval_estimates(")), re.M)}
    assert set(rows) == set(runs.setting), rows
    for setting, (iqm, low, high) in rows.items():
        scores = runs.loc[runs.setting == setting, "final_score"].to_numpy()
        assert np.isclose(iqm, scipy.stats.trim_mean(scores, 0.25), rtol=1e-5), setting
        assert low <= iqm <= high and low >= scores.min() - 1e-6 and high <= scores.max() + 1e-6

    for needle in ("sns.lineplot(", "plot_utils.plot_interval_estimates(", "kb.plot_curves("):
        assert _has_image(_cell(nb, needle)), f"no figure from the cell with {needle}"
