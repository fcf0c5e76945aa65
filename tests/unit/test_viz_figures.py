"""The logit-lens panel and the layer curves, on synthetic results."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlens.errors import AnalysisInputError
from vlens.layout import ImageSpan, assemble_layout, grid_span
from vlens.viz import attention_mass_figure, count_curve_figure, layer_curve, lens_grid, lens_panel, similarity_figure
from vlens.viz._html import figure_png
from vlens.viz.curves import layer_ticks
from vlens.viz.lens_panel import pick_layers

WORDS = ["zero", "red", "blue", "cat", "dog", "sky"]


def decode(i: int) -> str:
    return WORDS[i]


def grid_layout():
    ids = torch.tensor([[1, 9, 9, 9, 9, 9, 9, 2, 2]])
    span = grid_span(0, torch.arange(1, 7), rows=2, cols=3)
    return assemble_layout(ids, torch.ones_like(ids), 9, [[span]], [9])


def lens_result(n_layers: int, positions: torch.Tensor, top1: torch.Tensor, prob: float = 0.5):
    k = 2
    top_ids = torch.zeros(n_layers, positions.numel(), k, dtype=torch.long)
    top_ids[..., 0] = top1
    top_lp = torch.full((n_layers, positions.numel(), k), math.log(0.1))
    top_lp[..., 0] = math.log(prob)
    return SimpleNamespace(top_ids=top_ids, top_logprobs=top_lp, positions=positions, layers=torch.arange(n_layers))


def test_lens_grid_lays_words_on_the_image_grid():
    layout = grid_layout()
    top1 = torch.tensor([[1, 2, 3, 4, 5, 1], [5, 5, 5, 5, 5, 5]])  # layer x image token, raster order
    result = lens_result(2, torch.arange(1, 7), top1, prob=0.25)
    layers, words, probs, shape, on_grid = lens_grid(result, layout, decode)
    assert layers == [0, 1] and shape == (2, 3) and on_grid
    assert words[0].tolist() == [["red", "blue", "cat"], ["dog", "sky", "red"]]
    assert (words[1] == "sky").all()
    assert np.allclose(probs, 0.25)


def test_lens_grid_leaves_unanalysed_tokens_blank():
    layout = grid_layout()
    result = lens_result(1, torch.tensor([2, 6]), torch.tensor([[3, 4]]))  # only <img 0,1> and <img 1,2>
    _, words, probs, _, _ = lens_grid(result, layout, decode)
    assert words[0].tolist() == [["", "cat", ""], ["", "", "dog"]]
    assert np.isnan(probs[0, 0, 0]) and probs[0, 0, 1] == pytest.approx(0.5)
    with pytest.raises(AnalysisInputError, match="positions='image'"):
        lens_grid(lens_result(1, torch.tensor([7]), torch.tensor([[1]])), layout, decode)


def test_lens_panel_draws_one_panel_per_layer_with_its_words():
    layout = grid_layout()
    top1 = torch.arange(5 * 6).reshape(5, 6) % 5 + 1
    result = lens_result(5, torch.arange(1, 7), top1)
    fig = lens_panel(result, layout, decode, layers=[0, 4])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["embeddings", "layer 4"]
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts == [WORDS[i] for i in top1[4].tolist()]
    assert figure_png(fig).startswith(b"\x89PNG")
    with pytest.raises(AnalysisInputError, match="out of range"):
        lens_panel(result, layout, decode, layers=[7])


def test_lens_panel_qformer_queries_in_query_order():
    ids = torch.tensor([[1, 9, 9, 9, 9, 9, 2]])
    span = ImageSpan(0, torch.arange(1, 6), torch.zeros(5, dtype=torch.long), torch.full((5, 2), -1), {},
                     tuple(f"<q {i}>" for i in range(5)), query_label="Q-Former queries")
    layout = assemble_layout(ids, torch.ones_like(ids), 9, [[span]], [7])
    result = lens_result(1, torch.arange(1, 6), torch.tensor([[1, 2, 3, 4, 5]]))
    _, words, _, shape, on_grid = lens_grid(result, layout, decode)
    assert shape == (2, 3) and not on_grid
    assert words[0].tolist() == [["red", "blue", "cat"], ["dog", "sky", ""]]
    assert "Q-Former" in lens_panel(result, layout, decode)._suptitle.get_text()


def test_pick_layers_keeps_first_and_last():
    assert pick_layers(4, 6) == [0, 1, 2, 3]
    picked = pick_layers(33, 6)
    assert picked[0] == 0 and picked[-1] == 32 and len(picked) == 6


def test_layer_axis_convention():
    ticks, labels = layer_ticks(5, "resid")
    assert ticks == [0, 1, 2, 3, 4] and labels[0] == "emb" and labels[1] == "1"
    _, block_labels = layer_ticks(4, "block")
    assert block_labels[0] == "0"
    fig = layer_curve({"a": torch.rand(5), "b": torch.rand(5)}, ylabel="cos")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["emb", "1"]
    assert "embeddings" in ax.get_xlabel()
    assert len(ax.lines) == 2 and ax.lines[0].get_xdata().tolist() == [0, 1, 2, 3, 4]


def test_result_figures_render():
    sim = SimpleNamespace(per_layer=torch.linspace(0, 0.5, 4), against="text_states")
    assert "text_states" in similarity_figure(sim).axes[0].get_ylabel()
    att = SimpleNamespace(mass=torch.rand(3, 4))
    fig = attention_mass_figure(att)
    assert fig.axes[0].get_xlabel() == "transformer block"
    curve = SimpleNamespace(counts=torch.tensor([0, 2, 4]), loss=torch.tensor([3.0, 2.0, 1.0]), order=None)
    fig = count_curve_figure(curve)
    assert fig.axes[0].lines[0].get_ydata().tolist() == [3.0, 2.0, 1.0]
    for f in (fig,):
        assert figure_png(f).startswith(b"\x89PNG")


def test_figures_display_in_a_notebook_without_pyplot():
    from vlens.viz._mpl import new_figure

    fig = new_figure(2.0, 1.5)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")
    formatters = pytest.importorskip("IPython.core.formatters", reason="IPython is not installed here")
    assert formatters.PNGFormatter()(fig) == png  # what Jupyter shows, with no %matplotlib line
