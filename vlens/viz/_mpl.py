"""Matplotlib without pyplot: figures are plain ``Figure`` objects on an Agg canvas.

pyplot keeps a global registry of open figures and picks a GUI backend; views must have
no global state, so they build ``matplotlib.figure.Figure`` directly. Without pyplot a
notebook only prints ``<Figure size ...>``, so vlens's figures render themselves to PNG for
IPython's display (``_repr_png_``), with nothing registered anywhere.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


class NotebookFigure(Figure):
    """A ``Figure`` that a notebook displays by itself (as a PNG), with or without pyplot."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A new figure of ``width`` x ``height`` inches on its own Agg canvas."""
    fig = NotebookFigure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str) -> Any:
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        from vlens.errors import AnalysisInputError

        raise AnalysisInputError(f"unknown colormap {name!r}; try viridis, magma, coolwarm or RdBu_r") from None
