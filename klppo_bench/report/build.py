"""Build ``<experiment>/report/`` from the results store: scores, rliable aggregates, tables,
figures and ``report.md``.

Steps, in order, each its own module: :func:`~klppo_bench.report.collect.collect` (read the
store: runs done, not done and not readable, metrics, random-policy and normalized scores,
notes) -> :func:`~klppo_bench.report.compute.compute` (every rliable estimate, the tables) ->
:func:`~klppo_bench.report.draw.draw` (every figure) -> files (here). Nothing is dropped
silently: runs that are not done or not readable, runs without a final score, unequal seed
counts and skipped figures are written into ``notes``, which report.md shows first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from klppo_bench.report.collect import Report, ReportOptions, collect
from klppo_bench.report.compute import (AGGREGATE_COLUMNS, GRID_KEYS, LABEL, SCORE_COLUMN,
                                        UNEQUAL, compute)
from klppo_bench.report.draw import draw
from klppo_bench.store import atomic_write_bytes

__all__ = ["AGGREGATE_COLUMNS", "GRID_KEYS", "LABEL", "SCORE_COLUMN", "UNEQUAL", "Report",
           "ReportOptions", "build_report", "collect", "compute", "draw"]


def _clear_generated(out: Path) -> None:
    """Remove figures and tables of an earlier report, so none outlives its data."""
    for sub, exts in (("figures", (".pdf", ".png")), ("tables", (".md", ".tex", ".csv"))):
        if (out / sub).is_dir():
            for f in (out / sub).iterdir():
                if f.suffix in exts:
                    f.unlink()


def build_report(exp_dir: Path | str, options: ReportOptions | None = None) -> Report:
    """Compute and write the whole report; returns what was written. Runs whose record
    cannot be read are left out and listed (``Report.unreadable``, report.md)."""
    from klppo_bench.report.document import render

    rep = collect(Path(exp_dir), options or ReportOptions())
    final = rep.out
    # Build beside the report, then move the files in: a rebuild that fails half-way leaves
    # the previous report whole instead of a mix of old and new files.
    final.parent.mkdir(parents=True, exist_ok=True)
    rep.out = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        compute(rep)
        draw(rep)
        atomic_write_bytes(rep.out / "scores.csv", rep.scores.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "aggregates.csv",
                           rep.aggregates.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "report.md", render(rep).encode())
        final.mkdir(exist_ok=True)
        _clear_generated(final)
        built = sorted(p for p in rep.out.rglob("*") if p.is_file())
        for src in sorted(built, key=lambda p: p.name == "report.md"):  # report.md last
            dst = final / src.relative_to(rep.out)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(rep.out, ignore_errors=True)
        rep.out = final
    return rep
