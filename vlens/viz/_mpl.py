"""Matplotlib without pyplot: figures are plain ``Figure`` objects on an Agg canvas.

pyplot keeps a global registry of open figures and picks a GUI backend; views must have
no global state, so they build ``matplotlib.figure.Figure`` directly.
"""

from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str) -> Any:
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        from vlens.errors import AnalysisInputError

        raise AnalysisInputError(f"unknown colormap {name!r}; try viridis, magma, coolwarm or RdBu_r") from None
