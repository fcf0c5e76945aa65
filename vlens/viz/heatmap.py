"""Per-visual-token values drawn over the input image, on its patch grid.

Any quantity with one value per image token (attention received, contribution to the
loss, logit-lens match, similarity) becomes a map: ``ImageSpan.to_grid`` places each
grid token at its (row, col); for query-token connectors, whose tokens have no place,
it spreads each query's value over the patches its cross-attention reads. The map is
stretched over the image the model saw (cell (r, c) covers rows ``r*H/rows`` to
``(r+1)*H/rows``), cells without a token stay transparent, and the result is composited
at pixel level, so a value lands on exactly its patch. Which part of the input image the
grid covers is the family's fact (``ImageSpan.boxes``, from the adapter's
``token_boxes``); :func:`model_view_image` cuts that part out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import PIL.Image
import torch
from jaxtyping import Float
from torch import Tensor

from vlens.errors import AnalysisInputError
from vlens.viz._mpl import colormap, new_figure

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.layout import TokenLayout

MIN_SIDE = 256  # small images (the toy model's 64x64) are upscaled so patches are visible


def span_values(values: Any, layout: "TokenLayout", row: int = 0, image: int = 0) -> Float[Tensor, " n"]:
    """The slice of ``values`` that belongs to one image of one row.

    ``values`` holds one entry per token of that image, or one per image token of the
    whole row (every image concatenated in order, as analyses return them).
    """
    values = torch.as_tensor(values).detach().float().cpu().flatten()
    spans = layout.images[row]
    if not 0 <= image < len(spans):
        raise AnalysisInputError(f"row {row} has {len(spans)} image(s); image={image} does not exist")
    span = spans[image]
    if values.numel() == span.n_tokens:
        return values
    total = sum(s.n_tokens for s in spans)
    if values.numel() == total:
        start = sum(s.n_tokens for s in spans[:image])
        return values[start : start + span.n_tokens]
    raise AnalysisInputError(
        f"got {values.numel()} values; image {image} of row {row} has {span.n_tokens} tokens "
        f"(the row's images have {total})"
    )


def grid_region(span: Any) -> Optional[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1): the part of the input image the span's whole-image grid (tile 0)
    covers, from its tokens' boxes; None when the span has no boxes or no grid."""
    boxes = getattr(span, "boxes", None)
    if boxes is None or span.grid is None:
        return None
    on = boxes[span.on_grid]
    on = on[torch.isfinite(on).all(1)]
    if on.numel() == 0:
        return None
    return float(on[:, 0].min()), float(on[:, 1].min()), float(on[:, 2].max()), float(on[:, 3].max())


def model_view_image(inputs: "VLMInputs", processor: Any = None, row: int = 0, image: int = 0) -> PIL.Image.Image:
    """The part of the image the model's whole-image token grid sees, for drawing that grid on.

    For inputs from ``HookedVLM.prepare`` the family adapter states each token's box on the
    input image (``ImageSpan.boxes``): the result is the input image cut to the region its
    tile-0 grid covers (the central square a centre-cropping processor keeps; the whole
    image where the processor resizes it, or where the grid is a tiled family's base or
    global image), to the nearest pixel, so a grid stretched over it lands on each token's
    pixels. Query tokens have no boxes: their attention grid is the processed image's patch
    grid, so, like inputs built by hand, they get the processed pixels with the processor's
    normalisation undone when ``pixel_values`` holds one whole image per input image
    (``[n_images, 3, H, W]``), else the original image.
    """
    original = inputs.images[row][image]
    layout = getattr(inputs, "layout", None)
    region = grid_region(layout.images[row][image]) if layout is not None else None
    if region is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in region)
        return original if (x0, y0, x1, y1) == (0, 0, *original.size) else original.crop((x0, y0, x1, y1))
    pixels = getattr(inputs, "pixel_values", None)
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    n_images = sum(len(imgs) for imgs in inputs.images)
    if pixels is None or mean is None or std is None or pixels.ndim != 4 or pixels.shape[:2] != (n_images, 3):
        return original
    flat_index = sum(len(imgs) for imgs in inputs.images[:row]) + image
    img = pixels[flat_index].detach().float().cpu()
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255) or 1 / 255)
    raw = (img * std_t + mean_t) / rescale
    array = raw.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array, mode="RGB")


def overlay(
    grid: Float[Tensor, "rows cols"],
    image: Optional[PIL.Image.Image] = None,
    *,
    cmap: str = "viridis",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    alpha: float = 0.6,
    min_side: int = MIN_SIDE,
) -> PIL.Image.Image:
    """Composite a grid of values over an image, pixel by pixel.

    Each cell's colour is ``cmap((v - vmin) / (vmax - vmin))`` blended with the image
    as ``alpha * colour + (1 - alpha) * pixel``; NaN cells show the image unchanged.
    Without an image the colours are drawn on white at ``alpha = 1``.
    """
    grid_np = torch.as_tensor(grid).detach().float().cpu().numpy()
    if grid_np.ndim != 2:
        raise AnalysisInputError(f"grid must be [rows, cols], got shape {grid_np.shape}")
    rows, cols = grid_np.shape
    if image is None:
        scale = max(1, math.ceil(min_side / max(rows, cols)))
        base = np.full((rows * scale, cols * scale, 3), 255.0)
        alpha = 1.0
    else:
        img = image.convert("RGB")
        short = min(img.size)
        if short < min_side:
            factor = math.ceil(min_side / short)
            img = img.resize((img.width * factor, img.height * factor), PIL.Image.Resampling.NEAREST)
        base = np.asarray(img, dtype=np.float64)
    height, width = base.shape[:2]
    lo, hi = value_range(grid_np, vmin, vmax)
    normed = (grid_np - lo) / (hi - lo)
    colours = colormap(cmap)(np.clip(np.nan_to_num(normed, nan=0.0), 0, 1))[..., :3] * 255.0
    # Pixel row y belongs to cell floor(y * rows / height): the grid is stretched over the image.
    ri = np.minimum((np.arange(height) * rows) // height, rows - 1)
    ci = np.minimum((np.arange(width) * cols) // width, cols - 1)
    cell_colours = colours[ri][:, ci]
    valid = ~np.isnan(grid_np)[ri][:, ci]
    out = base.copy()
    out[valid] = alpha * cell_colours[valid] + (1 - alpha) * base[valid]
    return PIL.Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="RGB")


def value_range(values: Any, vmin: Optional[float] = None, vmax: Optional[float] = None) -> tuple[float, float]:
    """(vmin, vmax) over the finite values, defaulting to their min and max, never empty."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    if hi <= lo:
        hi = lo + 1e-12 if hi == lo else lo + 1.0
    return lo, hi


def image_heatmap(
    values: Any,
    span: Any,
    image: Optional[PIL.Image.Image] = None,
    *,
    title: Optional[str] = None,
    label: Optional[str] = None,
    cmap: str = "viridis",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    alpha: float = 0.6,
    size: float = 4.0,
) -> Any:
    """A matplotlib figure: one value per token of an image span, over the image.

    Args:
        values: One value per token of ``span`` (see :func:`span_values` to cut them
            out of a row's values).
        span: The ``ImageSpan`` (grid, or query tokens with ``query_attention``).
        image: The image to draw under the map (see :func:`model_view_image`); None
            draws the map alone.
        title: Axes title.
        label: Colour-bar label.
        cmap: Colour map name.
        vmin: Value at the bottom of the colour scale (default: the smallest).
        vmax: Value at the top of the colour scale (default: the largest).
        alpha: Opacity of the map over the image (see :func:`overlay`).
        size: Figure height in inches.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot).
    """
    try:
        grid = span.to_grid(torch.as_tensor(values).detach().float().cpu())
    except ValueError as err:
        raise AnalysisInputError(str(err)) from None
    lo, hi = value_range(grid.numpy(), vmin, vmax)
    composite = overlay(grid, image, cmap=cmap, vmin=lo, vmax=hi, alpha=alpha)
    aspect = composite.width / composite.height
    bottom = 0.35 if span.grid is None else 0.1
    top = 0.4 if title else 0.1
    width, height = size * aspect + 1.4, size + bottom + top
    fig = new_figure(width, height)
    ax = fig.add_axes((0.1 / width, bottom / height, size * aspect / width, size / height))
    ax.imshow(np.asarray(composite), interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if span.grid is None:
        ax.set_xlabel(f"{span.tokens_name} spread over the patches they attend to", fontsize=8)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(lo, hi), cmap=colormap(cmap))
    cax = fig.add_axes(((0.25 + size * aspect) / width, bottom / height, 0.18 / width, size / height))
    bar = fig.colorbar(mappable, cax=cax)
    if label:
        bar.set_label(label, fontsize=9)
    return fig


def heatmap_grid(
    panels: Sequence[tuple[str, Any]],
    span: Any,
    image: Optional[PIL.Image.Image] = None,
    *,
    label: Optional[str] = None,
    cmap: str = "viridis",
    shared_range: bool = True,
    alpha: float = 0.6,
    ncols: int = 4,
    panel_size: float = 2.4,
) -> Any:
    """Small multiples: several per-token value sets (e.g. one per layer) over the image.

    Args:
        panels: ``(title, values)`` pairs, each with one value per token of ``span``.
        shared_range: One colour scale for all panels (default) or one per panel.
    """
    if not panels:
        raise AnalysisInputError("heatmap_grid needs at least one panel")
    try:
        grids = [(title, span.to_grid(torch.as_tensor(v).detach().float().cpu())) for title, v in panels]
    except ValueError as err:
        raise AnalysisInputError(str(err)) from None
    stacked = np.stack([g.numpy() for _, g in grids])
    lo, hi = value_range(stacked)
    ncols = min(ncols, len(grids))
    nrows = math.ceil(len(grids) / ncols)
    fig = new_figure(panel_size * ncols + 1.0, panel_size * nrows + 0.3 * nrows)
    for i, (title, grid) in enumerate(grids):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        p_lo, p_hi = (lo, hi) if shared_range else value_range(grid.numpy())
        ax.imshow(np.asarray(overlay(grid, image, cmap=cmap, vmin=p_lo, vmax=p_hi, alpha=alpha)), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if shared_range:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.subplots_adjust(right=0.88)
        cax = fig.add_axes((0.91, 0.15, 0.02, 0.7))
        bar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=colormap(cmap)), cax=cax)
        if label:
            bar.set_label(label, fontsize=9)
    return fig
