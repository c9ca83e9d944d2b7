"""Which runs a report uses, and what it says about where they came from.

* **Definition.** An experiment is its current definition (:mod:`klppo_bench.manifest`): with
  a ``manifest.json`` only its runs are reported, and the others are listed with what differs
  (``Report.left_out``). ``--all-definitions`` keeps every run instead, with the setting label
  of each other definition suffixed by what differs (``clip [frames=1024]``), so two
  definitions are shown side by side and never pooled as seeds of one setting. Without a
  manifest (``klppo-bench run --out``) every run is reported, as before.
* **Variant sources.** Per variant and code hash: where the variant came from (the run's
  ``provenance.variant``) and the hash of its code (the config's ``code``).
* **Frames.** Requested and actually run frames, where they differ.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from klppo_bench.manifest import definition_labels, disk_runs, partition, read_manifest
from klppo_bench.stats.scores import RunRecords
from klppo_bench.store import RunDir


def select_definition(exp_dir: Path, records: RunRecords, all_definitions: bool
                      ) -> tuple[RunRecords, list, str]:
    """``(records, left_out, mode)``: the records the report uses, the
    :class:`~klppo_bench.manifest.LeftOut` groups of the runs it leaves out, and one of
    ``"manifest"``, ``"all-definitions"`` or ``"no manifest"``."""
    manifest = read_manifest(exp_dir)
    if all_definitions:
        labels = definition_labels(manifest, disk_runs(exp_dir))
        if labels:
            for df in (records.done, records.not_done):
                df["setting"] = [labels.get(r, s) for r, s in zip(df.run_id, df.setting)]
            records.done = records.done.sort_values(["setting", "env", "seed"], kind="stable") \
                .reset_index(drop=True)
        return records, [], "all-definitions"
    if manifest is None:
        return records, [], "no manifest"
    current, left_out = partition(manifest, disk_runs(exp_dir))
    records.done = records.done[records.done.run_id.isin(current)].reset_index(drop=True)
    records.not_done = records.not_done[records.not_done.run_id.isin(current)] \
        .reset_index(drop=True)
    records.unreadable = [u for u in records.unreadable if u.run_id in current]
    return records, left_out, "manifest"


def _source_text(source: dict) -> tuple[str, str]:
    """``(kind, where)``: the source's kind and its package / version, or its path."""
    if not source:
        return "unrecorded", "--"
    if source.get("error"):
        return "not loadable", source["error"]
    if source.get("package"):
        where = " ".join(x for x in (source["package"], source.get("version")) if x)
    else:
        where = source.get("path") or source.get("name") or "--"
        if source.get("sha256"):
            where += f" (sha256 {source['sha256'][:12]})"
    return source.get("kind") or "unrecorded", where


def variant_sources(exp_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, code hash) of the reported runs (read from each run's ``path``,
    so stored runs pooled by ``--compare-to`` are included): kind, package/version or path,
    the code hash, how many runs, and ``ran_with``: the code hashes the runs' processes loaded
    where they differ from the config's (the loss code changed while the sweep ran)."""
    rows = {}
    for r in runs.itertuples():
        run = RunDir(getattr(r, "path", None) or exp_dir / "runs" / r.run_id)
        try:
            code = run.config().get("code")
        except Exception:  # noqa: BLE001 -- read already; a race must not stop the report
            code = None
        source = ((run.status() or {}).get("provenance") or {}).get("variant") or {}
        key = (r.variant, code)
        kind, where = _source_text(source)
        row = rows.setdefault(key, {"variant": r.variant, "kind": kind, "source": where,
                                    "code": code or "unrecorded", "runs": 0, "ran_with": set()})
        row["runs"] += 1
        if source.get("code") and code and source["code"] != code:
            row["ran_with"].add(source["code"])
    out = pd.DataFrame(list(rows.values()),
                       columns=["variant", "kind", "source", "code", "runs", "ran_with"])
    return out.sort_values(["variant", "code"]).reset_index(drop=True)


def frames_line(runs: pd.DataFrame) -> str | None:
    """``Frames: 1,000 requested per run; runs took 1,024 ...``, or None when they agree."""
    if "frames_requested" not in runs or runs.empty:
        return None
    pairs = sorted({(int(a), int(b)) for a, b in zip(runs.frames_requested, runs.frames)
                    if pd.notna(a) and pd.notna(b)})
    if all(a == b for a, b in pairs):
        return None
    text = "; ".join(f"{a:,} requested, {b:,} run" for a, b in pairs)
    return (f"Frames per run: {text} (a run takes whole iterations of "
            f"`train.steps_per_iter`; curves and scores use the frames run).")
