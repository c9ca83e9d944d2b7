"""Build ``<experiment>/report/`` from the results store: scores, rliable aggregates, tables,
figures and ``report.md``.

Steps, in order, each its own module: :func:`~klppo_bench.report.collect.collect` (read the
store: runs done, not done and not readable, metrics, random-policy and normalized scores,
notes) -> :func:`~klppo_bench.report.compute.compute` (every rliable estimate, the tables) ->
:func:`~klppo_bench.report.draw.draw` (every figure) -> files (here). Nothing is dropped
silently: runs that are not done or not readable, runs without a final score, unequal seed
counts and skipped figures are written into ``notes``, which report.md shows first.

The report directory may hold other files (``--out`` pointing at a paper's directory): the
report deletes or overwrites only what it wrote itself, listed in its manifest
``.klppo-report-manifest.json`` there. A file of the same name as one it is about to write
that it did not write stops the report with one line before anything there changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from klppo_bench.errors import ConfigError
from klppo_bench.report.collect import Report, ReportOptions, collect
from klppo_bench.report.compute import (AGGREGATE_COLUMNS, GRID_KEYS, LABEL, SCORE_COLUMN,
                                        UNEQUAL, compute)
from klppo_bench.report.draw import draw
from klppo_bench.store import atomic_write_bytes, atomic_write_json, check_output_dir

__all__ = ["AGGREGATE_COLUMNS", "GRID_KEYS", "LABEL", "MANIFEST", "SCORE_COLUMN", "UNEQUAL",
           "Report", "ReportOptions", "build_report", "collect", "compute", "draw"]

MANIFEST = ".klppo-report-manifest.json"
"""In the report directory: the files the last report wrote there (relative paths)."""
LEGACY_TITLE = "# Report: "
"""How report.md began before reports had a manifest (see :func:`written_before`)."""


def _inside(name: object) -> bool:
    """A manifest entry names a file inside the report directory (a damaged or edited
    manifest must never make the report touch anything outside it, nor the manifest)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return False
    parts = Path(name).parts
    return ".." not in parts and "." not in parts and parts[0] != MANIFEST


def written_before(out: Path, names: list[str]) -> set[str]:
    """The files in ``out`` that an earlier report wrote: those its manifest lists; without a
    manifest, if ``out/report.md`` is a report of a version before manifests, those of
    ``names`` (what this report writes) that exist, and no other. A damaged manifest owns
    nothing."""
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files")
    except FileNotFoundError:
        try:
            with open(out / "report.md", encoding="utf-8") as f:
                legacy = f.readline().startswith(LEGACY_TITLE)
        except (OSError, UnicodeDecodeError):
            legacy = False
        return {n for n in names if legacy and (out / n).is_file()}
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in files if _inside(n)} if isinstance(files, list) else set()


def _install(built: Path, final: Path) -> None:
    """Move the report built in ``built`` into ``final``: refuse (``ConfigError``, nothing
    changed) if a file there of the same name as one of ours was not written by a report;
    claim the new files in the manifest first, move them in (report.md last), remove the
    previous report's files that this one did not write again, and write the manifest."""
    new = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    ours = written_before(final, new)
    foreign = [n for n in new if n not in ours and (os.path.lexists(final / n))]
    if foreign:
        raise ConfigError(
            f"{final}: {len(foreign)} file(s) there of the names the report writes were not "
            f"written by it ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}; not "
            f"in {MANIFEST}); allowed: move them away, or another --out (nothing was written)")
    atomic_write_json(final / MANIFEST, {"generator": "klppo-bench report",
                                        "files": sorted(ours | set(new))})
    for name in sorted(new, key=lambda n: n == "report.md"):
        dst = final / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built / name, dst)
    for name in sorted(ours - set(new)):
        if (final / name).is_file() or (final / name).is_symlink():
            (final / name).unlink()
    atomic_write_json(final / MANIFEST, {"generator": "klppo-bench report", "files": new})


def build_report(exp_dir: Path | str, options: ReportOptions | None = None) -> Report:
    """Compute and write the whole report; returns what was written. Runs whose record
    cannot be read are left out and listed (``Report.unreadable``, report.md)."""
    from klppo_bench.report.document import render

    options = options or ReportOptions()
    check_output_dir(options.out or Path(exp_dir) / "report", "report directory")
    rep = collect(Path(exp_dir), options)
    final = rep.out
    # Build beside the report, then move the files in: a rebuild that fails half-way leaves
    # the previous report whole instead of a mix of old and new files.
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        rep.out = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    except OSError as err:
        raise ConfigError(f"report directory {final}: cannot be written ({err.strerror}); "
                          "allowed: a writable directory") from err
    try:
        compute(rep)
        draw(rep)
        atomic_write_bytes(rep.out / "scores.csv", rep.scores.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "aggregates.csv",
                           rep.aggregates.to_csv(index=False).encode())
        atomic_write_bytes(rep.out / "report.md", render(rep).encode())
        final.mkdir(exist_ok=True)
        _install(rep.out, final)
    finally:
        shutil.rmtree(rep.out, ignore_errors=True)
        rep.out = final
    return rep
