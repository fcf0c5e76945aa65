"""Views of vlens results: CircuitsVis attention, image heatmaps, lens panels, curves, the report.

Views are functions of results (or tensors) and a layout. They return HTML views or
matplotlib figures and have no side effects: no printing, no network, no global state
(figures are built without pyplot; the CircuitsVis bundle is inlined from the installed
package, never fetched).
"""

from vlens.viz._html import HTMLView, figure_png, load_circuitsvis
from vlens.viz.attention import attention_heads_view, attention_view, choose_window
from vlens.viz.curves import (
    attention_mass_figure,
    bar_figure,
    count_curve_figure,
    layer_curve,
    similarity_figure,
)
from vlens.viz.heatmap import heatmap_grid, image_heatmap, model_view_image, overlay, span_values
from vlens.viz.lens_panel import lens_grid, lens_panel
from vlens.viz.report import Report, Section, build_report, report_inputs

__all__ = [
    "HTMLView",
    "Report",
    "Section",
    "attention_heads_view",
    "attention_mass_figure",
    "attention_view",
    "bar_figure",
    "build_report",
    "choose_window",
    "count_curve_figure",
    "figure_png",
    "heatmap_grid",
    "image_heatmap",
    "layer_curve",
    "lens_grid",
    "lens_panel",
    "load_circuitsvis",
    "model_view_image",
    "overlay",
    "report_inputs",
    "similarity_figure",
    "span_values",
]
