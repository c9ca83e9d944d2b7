"""Figure style: one colour per setting everywhere, sizes for a single paper column, and the
PDF (TrueType fonts) + 300-dpi PNG pair every figure is saved as."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from klppo_bench.files import FILE_MODE, write_error  # noqa: E402

COLUMN_WIDTH = 3.3   # inches: one column of a two-column paper
DOUBLE_WIDTH = 6.9   # inches: both columns
LINESTYLES = ("-", "--", ":", "-.")

RC = {
    "pdf.fonttype": 42,       # TrueType, not Type 3: editable and accepted by publishers
    "ps.fonttype": 42,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6.5,
    "legend.frameon": False,
    "lines.linewidth": 1.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "savefig.dpi": 300,
    "figure.dpi": 100,
}


def apply() -> None:
    """Set the rc parameters (Agg backend, TrueType fonts, paper sizes)."""
    plt.rcParams.update(RC)


@dataclass(frozen=True)
class Style:
    color: tuple
    linestyle: str


def setting_styles(settings: list[str]) -> dict[str, Style]:
    """A fixed colour (seaborn's colour-blind palette) and line style per setting, assigned
    in the given order: the same setting looks the same in every figure of a report."""
    palette = sns.color_palette("colorblind", 10)
    return {s: Style(tuple(palette[i % 10]), LINESTYLES[(i // 10) % len(LINESTYLES)])
            for i, s in enumerate(settings)}


def save_figure(fig, stem: Path, png_dpi: int = 300) -> list[Path]:
    """Write ``stem.pdf`` (vector, TrueType fonts) and ``stem.png`` (``png_dpi``), each through
    a temporary file renamed into place; close the figure. Returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("pdf", "png"):
        final = stem.with_suffix(f".{ext}")
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".{ext}",
                                       dir=stem.parent)
            os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; every other result is 0644
            os.close(fd)
            # dpi only matters to a PDF's rasterized parts (none by default): keep them at 300
            fig.savefig(tmp, format=ext, dpi=png_dpi if ext == "png" else 300,
                        bbox_inches="tight", pad_inches=0.02)
            os.replace(tmp, final)
        except OSError as err:
            raise write_error(final, err) from err
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(final)
    plt.close(fig)
    return paths
