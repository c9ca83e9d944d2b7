"""``klppo-bench report results/<experiment>``: rliable statistics, tables, figures, report.md.

Writes ``<experiment>/report/``: ``scores.csv``, ``aggregates.csv``, ``tables/*.{md,tex,csv}``,
``figures/*.{pdf,png}`` and ``report.md``. See :mod:`klppo_bench.report.build`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main_report(args) -> int:
    """CLI entry point (``args``: experiment, reps, random_state, baseline and the optional
    random_episodes, random_seed, out, all_definitions). Returns the exit status: 0, or 1
    when the report was written without some runs whose record could not be read (listed on
    stderr and in report.md under *Runs not readable*). Runs of other definitions than the
    experiment's current one are left out by design (report.md lists them), not an error."""
    from klppo_bench.report.build import ReportOptions, build_report

    opts = ReportOptions(
        reps=args.reps, random_state=args.random_state, baseline=args.baseline,
        random_episodes=getattr(args, "random_episodes", 100),
        random_seed=getattr(args, "random_seed", 0),
        all_definitions=getattr(args, "all_definitions", False),
        png_dpi=getattr(args, "png_dpi", 300),
        compare_to=Path(args.compare_to) if getattr(args, "compare_to", None) else None,
        out=Path(args.out) if getattr(args, "out", None) else None)
    rep = build_report(Path(args.experiment), opts)
    other = sum(len(g.run_ids) for g in rep.left_out)
    print(f"report: {len(rep.runs)} finished runs, {len(rep.settings)} settings, "
          f"{len(rep.envs)} env(s); {len(rep.not_done)} run(s) not done, "
          f"{len(rep.unreadable)} not readable"
          + (f", {other} of other definitions left out" if other else ""))
    for note in rep.notes:
        print(f"  note: {note}")
    print(f"written: {rep.out / 'report.md'}")
    for u in rep.unreadable:
        print(f"klppo-bench: run not readable, left out: {u.path}: {u.error}", file=sys.stderr)
    return 1 if rep.unreadable else 0
