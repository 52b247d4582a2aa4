"""Shared matplotlib helpers for the experiments' figures: one look, the Agg renderer, a quiet savefig.

Every experiment's `plot(result, path)` draws with these, so the figures in docs/experiments/img/ look
alike: the same size, fonts, grid and colors, and the block-size axis of the paper's Figs. 18 and 19
(powers of two, labelled 1 to 256). Figures are built from `matplotlib.figure.Figure` directly, not
through pyplot, so drawing one needs no display, leaves no open figure behind and does not change the
caller's matplotlib backend; a PNG is rendered by Agg.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

# One color per kind of line, the same in every figure (matplotlib's "tab" palette).
COLORS = {
    "sharegpt": "tab:blue",
    "alpaca": "tab:orange",
    "measured": "tab:blue",
    "model": "tab:gray",
    "recompute": "tab:red",
    "swap_in": "tab:blue",
    "swap_out": "tab:green",
    "swap_total": "tab:purple",
    "batched": "tab:gray",
}
FONT_SIZE = 10
# inches per panel: two side by side fit a docs page at 100% zoom
PANEL_SIZE = (4.6, 3.4)
DPI = 120


def new_figure(
    ncols: int = 1,
    title: str | None = None,
    panel_size: tuple[float, float] = PANEL_SIZE,
    nrows: int = 1,
) -> tuple[Figure, list[Axes]]:
    """A figure of `nrows` x `ncols` panels, in the shared style.

    Args:
        ncols: panels in one row.
        title: a title over all panels (None: none).
        panel_size: (width, height) of one panel in inches.
        nrows: rows of panels.

    Returns:
        The figure and its axes, left to right, then top to bottom.
    """
    width, height = panel_size
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=FONT_SIZE - 1)
        ax.xaxis.label.set_size(FONT_SIZE)
        ax.yaxis.label.set_size(FONT_SIZE)
        ax.title.set_size(FONT_SIZE + 1)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 2)
    return fig, axes


def block_size_axis(ax: Axes, block_sizes: Sequence[int]) -> None:
    """A log2 x axis labelled with the block sizes themselves (1, 2, 4, ... 256), as in Figs. 18-19."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(block_sizes)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in block_sizes])
    ax.set_xlabel("block size (tokens)")


def legend(ax: Axes, outside: bool = False) -> None:
    """The legend in the shared style: small, no frame, where it covers least (or right of the axes)."""
    if outside:
        ax.legend(
            fontsize=FONT_SIZE - 1,
            frameon=False,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
        )
    else:
        ax.legend(fontsize=FONT_SIZE - 1, frameon=False, loc="best")


def check_plot_path(path: str | Path) -> None:
    """Raise ValueError unless matplotlib can write a figure to `path`: its suffix names a format
    (.png, .svg, .pdf, ...). Checked before an experiment runs, so a typo does not waste the run.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        found = f"the suffix {'.' + suffix!r}" if suffix else "no suffix"
        raise ValueError(
            f"{str(path)!r} has {found}; matplotlib writes {', '.join('.' + f for f in sorted(formats))}"
        )


def savefig(fig: Figure, path: str | Path) -> Path:
    """Write the figure; the format follows the suffix (.png, .svg, .pdf).

    PNGs carry no "Software" stamp (matplotlib's version), so a figure regenerated from the same
    numbers with the same matplotlib has the same bytes.

    Raises:
        ValueError: for a suffix matplotlib cannot write.
    """
    path = Path(path)
    metadata = {"Software": None} if path.suffix.lower() == ".png" else None
    fig.savefig(path, metadata=metadata)
    return path


__all__ = [
    "COLORS",
    "block_size_axis",
    "check_plot_path",
    "legend",
    "new_figure",
    "savefig",
]
