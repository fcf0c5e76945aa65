"""Heatmaps over the image: a known value lands on its known patch, pixel for pixel."""

from __future__ import annotations

import dataclasses
import io
from types import SimpleNamespace

import matplotlib
import numpy as np
import PIL.Image
import pytest
import torch

from vlens.errors import AnalysisInputError
from vlens.layout import ImageSpan, assemble_layout, grid_span
from vlens.viz import image_heatmap, model_view_image, overlay, span_values
from vlens.viz._html import figure_png
from vlens.viz.heatmap import heatmap_grid

GREY = (128, 128, 128)


def grey(size=(48, 32)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, GREY)


def expected_colour(value: float, lo: float, hi: float, alpha: float, cmap: str = "viridis") -> np.ndarray:
    rgb = np.array(matplotlib.colormaps[cmap]((value - lo) / (hi - lo))[:3]) * 255
    return alpha * rgb + (1 - alpha) * np.array(GREY)


def one_hot_values(rows: int, cols: int, r: int, c: int, value: float = 1.0) -> torch.Tensor:
    v = torch.zeros(rows * cols)
    v[r * cols + c] = value
    return v


def test_overlay_puts_the_value_on_its_patch():
    span = grid_span(0, torch.arange(6), rows=2, cols=3)
    grid = span.to_grid(one_hot_values(2, 3, r=1, c=2))
    img = overlay(grid, grey((48, 32)), alpha=0.5, min_side=0)
    assert img.size == (48, 32)
    px = np.asarray(img, dtype=float)
    hot = expected_colour(1.0, 0.0, 1.0, 0.5)
    cold = expected_colour(0.0, 0.0, 1.0, 0.5)
    # Patch (1, 2) covers rows 16..31 and columns 32..47 of a 48x32 image.
    assert np.abs(px[16:, 32:] - hot).max() <= 1
    assert np.abs(px[:16, :] - cold).max() <= 1
    assert np.abs(px[16:, :32] - cold).max() <= 1


def test_overlay_leaves_cells_without_a_token_untouched():
    grid = torch.tensor([[float("nan"), 0.0], [1.0, 0.5]])
    px = np.asarray(overlay(grid, grey((20, 20)), min_side=0), dtype=float)
    assert (px[:10, :10] == GREY).all()
    assert not (px[10:, :10] == GREY).all()


def test_overlay_upscales_small_images():
    img = overlay(torch.ones(2, 2), grey((16, 16)), min_side=64)
    assert img.size == (64, 64)


def test_image_heatmap_figure_pixels():
    span = grid_span(0, torch.arange(4, 16), rows=3, cols=4)
    values = one_hot_values(3, 4, r=2, c=1, value=5.0)
    fig = image_heatmap(values, span, grey((256, 192)), title="known patch", label="v", alpha=0.6)
    png = figure_png(fig, dpi=fig.dpi)
    rendered = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    ax = fig.axes[0]
    height = rendered.shape[0]

    def pixel(r: int, c: int) -> np.ndarray:
        x, y = ax.transAxes.transform(((c + 0.5) / 4, 1 - (r + 0.5) / 3))
        return rendered[int(round(height - y)), int(round(x))]

    assert np.abs(pixel(2, 1) - expected_colour(5.0, 0.0, 5.0, 0.6)).max() <= 3
    for r, c in [(0, 0), (1, 1), (2, 2), (0, 3)]:
        assert np.abs(pixel(r, c) - expected_colour(0.0, 0.0, 5.0, 0.6)).max() <= 3
    assert fig.axes[0].get_title() == "known patch"
    assert fig.axes[1].get_ylabel() == "v"  # the colour bar


def test_qformer_span_spreads_over_the_patches_it_reads():
    # Two query tokens; query 1 reads only patch (0, 1) of a 2x2 vision grid.
    attn = torch.zeros(2, 2, 2)
    attn[0] = 0.25
    attn[1, 0, 1] = 1.0
    span = ImageSpan(
        image_index=0, positions=torch.tensor([3, 4]), tile=torch.zeros(2, dtype=torch.long),
        row_col=torch.full((2, 2), -1), tile_grids={}, labels=("<q 0>", "<q 1>"), query_attention=attn,
        query_label="Q-Former queries",  # what the family's adapter calls them
    )
    grid = span.to_grid(torch.tensor([0.0, 1.0]))
    assert grid.argmax().item() == 1
    fig = image_heatmap(torch.tensor([0.0, 1.0]), span, grey((32, 32)))
    assert "Q-Former" in fig.axes[0].get_xlabel()
    unnamed = image_heatmap(torch.tensor([0.0, 1.0]), dataclasses.replace(span, query_label=None), grey((32, 32)))
    assert unnamed.axes[0].get_xlabel().startswith("query tokens")
    no_grid = ImageSpan(0, torch.tensor([3]), torch.zeros(1, dtype=torch.long), torch.full((1, 2), -1), {}, ("<q 0>",))
    with pytest.raises(AnalysisInputError, match="no grid"):
        image_heatmap(torch.tensor([1.0]), no_grid)


def test_span_values_cuts_one_image_out_of_a_row():
    ids = torch.tensor([[1, 9, 9, 9, 9, 2, 9, 9, 9, 9, 2]])
    spans = [grid_span(0, torch.arange(1, 5), 2, 2), grid_span(1, torch.arange(6, 10), 2, 2)]
    layout = assemble_layout(ids, torch.ones_like(ids), 9, [spans], [11])
    values = torch.arange(8.0)
    assert span_values(values, layout, image=1).tolist() == [4.0, 5.0, 6.0, 7.0]
    assert span_values(values[:4], layout, image=1).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(AnalysisInputError, match="got 5 values"):
        span_values(torch.ones(5), layout)
    with pytest.raises(AnalysisInputError, match="image=2"):
        span_values(values, layout, image=2)


def test_model_view_image_undoes_normalisation():
    array = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pixels = (torch.tensor(array).permute(2, 0, 1).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    inputs = SimpleNamespace(images=((PIL.Image.new("RGB", (3, 3)),),), pixel_values=pixels[None])
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=mean, image_std=std, rescale_factor=1 / 255))
    seen = np.asarray(model_view_image(inputs, processor))
    assert np.abs(seen.astype(int) - array.astype(int)).max() <= 1
    # Flattened patches (Qwen2-VL style) cannot be unprocessed: the original image comes back.
    flat = SimpleNamespace(images=inputs.images, pixel_values=torch.zeros(16, 12))
    assert model_view_image(flat, processor) is inputs.images[0][0]
    # Tiles or crops ([images, tiles, 3, H, W]) too: their tile-0 grid spans the original image.
    tiles = SimpleNamespace(images=inputs.images, pixel_values=pixels[None, None].expand(1, 3, 3, 8, 8))
    assert model_view_image(tiles, processor) is inputs.images[0][0]


def test_heatmap_grid_shares_one_scale():
    span = grid_span(0, torch.arange(4), rows=2, cols=2)
    fig = heatmap_grid([("a", torch.zeros(4)), ("b", torch.ones(4))], span, grey((32, 32)), label="x")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
    assert len(fig.axes) == 3  # two panels and one colour bar
    with pytest.raises(AnalysisInputError):
        heatmap_grid([], span)
