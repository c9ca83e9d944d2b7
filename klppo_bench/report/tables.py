"""Tables as Markdown, LaTeX (booktabs) and CSV from one description.

A table is a DataFrame of cells: a string (label), an int (a count), a float, or a
``(point, low, high)`` tuple (a number with its 95% CI). Markdown writes ``1.23 [1.01, 1.40]``,
LaTeX ``$1.23_{\\,[1.01,\\,1.40]}$``. In a column with a rule (``max`` or ``min``), within a
group of rows (e.g. one environment), the best value is **bold** only when its 95% CI is
disjoint from every other's; otherwise it and every value whose CI overlaps its CI (or that
prints the same) are underlined: statistically tied, no winner. Values without a CI are never
marked. The CSV keeps full precision with ``_ci_low`` / ``_ci_high`` columns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from klppo_bench.stats import aggregate as agg
from klppo_bench.store import atomic_write_bytes

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def decimals(x: float) -> int:
    """Digits after the point: enough for three significant figures, at most three."""
    if x is None or not math.isfinite(x) or x == 0:
        return 2
    a = abs(x)
    return 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3


def fmt(x, digits: int | None = None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "--"
    return f"{x:.{decimals(x) if digits is None else digits}f}"


MARK_LEGEND = ("underlined: statistically tied for best (overlapping 95% CIs); bold: best "
               "with a CI disjoint from the runner-up (and from every other CI)")
BOLD, UNDERLINE = "bold", "underline"


def same_when_printed(a: float, b: float) -> bool:
    """Whether two values print the same (at the digits ``a`` is printed with)."""
    d = decimals(a)
    return fmt(a, d) == fmt(b, d)


def mark_mask(cells: pd.DataFrame, best: Mapping[str, str], group: str | None) -> pd.DataFrame:
    """Per cell: ``"bold"`` (best, CI disjoint from all others in its column and group),
    ``"underline"`` (statistically tied for best) or ``""``."""
    mask = pd.DataFrame("", index=cells.index, columns=cells.columns)
    groups = [cells.index] if group is None else \
        [g.index for _, g in cells.groupby(group, sort=False)]
    for col, rule in best.items():
        for idx in groups:
            estimates = {i: tuple(float(v) for v in cells.at[i, col]) for i in idx
                         if isinstance(cells.at[i, col], tuple)
                         and np.isfinite(list(cells.at[i, col])).all()}
            if sum(np.isfinite(e[0]) for e in estimates.values()) < 2:
                continue
            winner, tied = agg.best_and_tied(estimates, rule, same_when_printed)
            if tied:
                mask.loc[[winner, *tied], col] = UNDERLINE
            else:
                mask.at[winner, col] = BOLD
    return mask


def _md_mark(text: str, mark: str) -> str:
    if text == "--" or not mark:
        return text
    return f"**{text}**" if mark == BOLD else f"<ins>{text}</ins>"


def _tex_mark(text: str, mark: str) -> str:
    """Inside math mode."""
    if text == "--" or not mark:
        return text
    return rf"\mathbf{{{text}}}" if mark == BOLD else rf"\underline{{{text}}}"


def _cell_md(cell, mark: str) -> str:
    if isinstance(cell, tuple) and not math.isfinite(cell[0]):
        return "--"
    if isinstance(cell, tuple):
        p, lo, hi = cell
        d = decimals(p)
        return _md_mark(fmt(p, d), mark) + f" [{fmt(lo, d)}, {fmt(hi, d)}]"
    text = fmt(cell) if isinstance(cell, float) else str(cell).replace("|", "\\|")
    return _md_mark(text, mark)


def _cell_tex(cell, mark: str) -> str:
    if isinstance(cell, tuple) and not math.isfinite(cell[0]):
        return "--"
    if isinstance(cell, tuple):
        p, lo, hi = cell
        d = decimals(p)
        return rf"${_tex_mark(fmt(p, d), mark)}_{{\,[{fmt(lo, d)},\,{fmt(hi, d)}]}}$"
    if isinstance(cell, float):
        return f"${_tex_mark(fmt(cell), mark)}$"
    return latex_escape(cell)


def to_markdown(cells: pd.DataFrame, best: Mapping[str, str] | None = None,
                group: str | None = None) -> str:
    mask = mark_mask(cells, best or {}, group)
    numeric = [not isinstance(cells[c].iloc[0], str) for c in cells.columns] if len(cells) else []
    lines = ["| " + " | ".join(cells.columns) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for i in cells.index:
        lines.append("| " + " | ".join(_cell_md(cells.at[i, c], mask.at[i, c])
                                       for c in cells.columns) + " |")
    return "\n".join(lines) + "\n"


def to_latex(cells: pd.DataFrame, best: Mapping[str, str] | None = None,
             group: str | None = None, caption: str = "") -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); a rule between groups."""
    mask = mark_mask(cells, best or {}, group)
    align = "".join("l" if isinstance(cells[c].iloc[0], str) else "c" for c in cells.columns)
    out = [f"% {caption}" if caption else "% generated by klppo-bench report",
           f"\\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(latex_escape(c) for c in cells.columns) + r" \\", r"\midrule"]
    previous = None
    for i in cells.index:
        if group is not None and previous is not None and cells.at[i, group] != previous:
            out.append(r"\midrule")
        previous = cells.at[i, group] if group is not None else None
        out.append(" & ".join(_cell_tex(cells.at[i, c], mask.at[i, c])
                              for c in cells.columns) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def to_csv_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """Full-precision CSV form: each CI cell becomes value, _ci_low and _ci_high columns."""
    out = {}
    for c in cells.columns:
        if len(cells) and isinstance(cells[c].iloc[0], tuple):
            out[c] = [v[0] for v in cells[c]]
            out[f"{c}_ci_low"] = [v[1] for v in cells[c]]
            out[f"{c}_ci_high"] = [v[2] for v in cells[c]]
        else:
            out[c] = list(cells[c])
    return pd.DataFrame(out)


def full_caption(caption: str, best: Mapping[str, str] | None) -> str:
    """The caption, followed by what bold and underline mean where cells can be marked."""
    if not best:
        return caption
    return f"{caption.rstrip('.')}. Marks: {MARK_LEGEND}." if caption else \
        f"Marks: {MARK_LEGEND}."


def write_table(cells: pd.DataFrame, stem: Path, best: Mapping[str, str] | None = None,
                group: str | None = None, caption: str = "") -> str:
    """Write ``stem.md``, ``stem.tex`` and ``stem.csv``; return the Markdown (the table, then
    its caption in italics)."""
    stem = Path(stem)
    caption = full_caption(caption, best)
    md = to_markdown(cells, best, group) + (f"\n*{caption}*\n" if caption else "")
    atomic_write_bytes(stem.with_suffix(".md"), md.encode())
    atomic_write_bytes(stem.with_suffix(".tex"), to_latex(cells, best, group, caption).encode())
    atomic_write_bytes(stem.with_suffix(".csv"), to_csv_frame(cells).to_csv(index=False).encode())
    return md
