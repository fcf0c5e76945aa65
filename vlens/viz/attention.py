"""CircuitsVis attention views whose tokens read ``<img r,c>`` / ``<q k>``.

Attention patterns of a vision LLM are large (hundreds of image tokens, dozens of heads
and layers), so the views show a *window*: chosen layers, chosen heads and a chosen set
of positions, which serve both as queries and keys (CircuitsVis draws square,
causally-masked patterns). The default window renders quickly at any model size: every
real token when there are few, else the text tokens plus the image tokens that text
attends to most (see :func:`choose_window`), with the window's size chosen so the view
holds about ``DEFAULT_CELL_BUDGET`` pattern cells.

Each layer gives CircuitsVis's ``AttentionHeads`` (one thumbnail per head, click to zoom)
and a ``ColoredTokens`` strip: the window's tokens coloured by the attention the focus
query (by default the last token of the window) pays them, averaged over the shown heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.errors import AnalysisInputError
from vlens.viz._circuitsvis import render_component, token_text
from vlens.viz._html import HTMLView, esc

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.layout import TokenLayout

Window = Union[str, slice, Sequence[int], Tensor]
DEFAULT_MAX_TOKENS = 96
# CircuitsVis draws every cell of every head's pattern with chart.js; render time grows with
# layers x heads x window^2 (about 1.5 s for 16k cells and 4.5 s for 74k on a slow CPU). The
# automatic window is sized so a view holds about this many cells.
DEFAULT_CELL_BUDGET = 60_000
MIN_AUTO_TOKENS = 16
_DECIMALS = 3  # attention values are shown as colours; 3 decimals keep the page small


def attention_heads_view(
    pattern: Float[Tensor, "head q k"],
    tokens: Sequence[str],
    *,
    head_names: Optional[Sequence[str]] = None,
    focus_query: int = -1,
    element_id: str = "vlens-attention",
    title: Optional[str] = None,
) -> HTMLView:
    """One CircuitsVis ``AttentionHeads`` view plus a token strip, for a square window.

    Args:
        pattern: Attention of each head from each query to each key of the window
            (queries and keys are the same tokens, in sequence order).
        tokens: The window's token strings (``<img r,c>`` for image tokens).
        head_names: Label per head (default ``H0``, ``H1``, ...).
        focus_query: Window index of the query whose attention colours the token strip.
        element_id: Fixed id prefix of the view's elements (``-heads``, ``-tokens``).
        title: Heading shown above the view.
    """
    pattern = torch.as_tensor(pattern).detach().float().cpu()
    if pattern.ndim != 3 or pattern.shape[1] != pattern.shape[2]:
        raise AnalysisInputError(f"pattern must be [head, q, k] with q == k, got shape {tuple(pattern.shape)}")
    n = pattern.shape[1]
    if len(tokens) != n:
        raise AnalysisInputError(f"got {len(tokens)} tokens for a {n}x{n} attention window")
    if not -n <= focus_query < n:
        raise AnalysisInputError(f"focus_query {focus_query} is outside the window of {n} tokens")
    names = list(head_names) if head_names is not None else [f"H{h}" for h in range(pattern.shape[0])]
    if len(names) != pattern.shape[0]:
        raise AnalysisInputError(f"got {len(names)} head names for {pattern.shape[0]} heads")
    rounded = torch.round(pattern * 10**_DECIMALS) / 10**_DECIMALS
    focus = focus_query % n
    strip = rounded[:, focus, :].mean(0)
    heads_html = render_component(
        "AttentionHeads",
        f"{element_id}-heads",
        {
            "attention": rounded,
            "tokens": token_text(tokens, "AttentionHeads"),
            "attentionHeadNames": names,
            "maxValue": 1.0,
            "minValue": 0.0,
            "maskUpperTri": True,
        },
    )
    strip_html = render_component(
        "ColoredTokens",
        f"{element_id}-tokens",
        {"tokens": token_text(tokens, "ColoredTokens"), "values": strip, "minValue": 0.0, "maxValue": float(strip.max().clamp_min(1e-6))},
    )
    heading = f"<h3>{esc(title)}</h3>" if title else ""
    caption = (
        f'<p class="caption">Tokens coloured by the attention that <code>{esc(tokens[focus])}</code> '
        f"(window position {focus}) pays them, mean over the heads shown.</p>"
    )
    fragment = f'<div class="vlens-attention" id="{esc(element_id)}">{heading}{heads_html}{caption}{strip_html}</div>'
    return HTMLView(fragment, needs_circuitsvis=True, title=title or "vlens attention")


def choose_window(
    layout: "TokenLayout",
    row: int = 0,
    window: Window = "auto",
    patterns: Optional[Float[Tensor, "layer head q k"]] = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Int[Tensor, " n"]:
    """The sequence positions an attention view shows, ascending.

    Args:
        layout: The batch's ``TokenLayout``.
        row: Batch row.
        window: ``"auto"``; ``"all"`` (every real token); a segment name of
            ``TokenLayout.mask`` (``"image"``, ``"text"``, ``"instruction"``, ...);
            ``"text+image"``-style unions of segment names; a ``slice`` of positions;
            or explicit positions.
        patterns: Full patterns of the row for the layers shown, used by ``"auto"``
            to rank image tokens.
        max_tokens: Size limit of ``"auto"``.

    ``"auto"`` takes every real token when there are at most ``max_tokens``; else every
    text token (the last ``max_tokens`` if there are more), then fills the window with
    the image tokens that the text tokens after the image attend to most (mean over
    layers, heads and queries), so a 576-token image still shows where text looks.
    """
    length = int(layout.lengths[row])
    real = torch.arange(length)
    if isinstance(window, str):
        if window == "auto":
            return _auto_window(layout, row, patterns, max_tokens)
        if window == "all":
            return real
        mask = torch.zeros(layout.seq_len, dtype=torch.bool)
        for name in window.split("+"):
            try:
                mask |= layout.mask(name.strip())[row].cpu()
            except ValueError as err:
                raise AnalysisInputError(f"unknown attention window {window!r}: {err}") from None
        chosen = mask.nonzero().flatten()
    elif isinstance(window, slice):
        chosen = real[window]
    else:
        chosen = torch.as_tensor(list(window) if not isinstance(window, Tensor) else window, dtype=torch.long).flatten()
        chosen = torch.unique(chosen)
    if chosen.numel() == 0:
        raise AnalysisInputError(f"attention window {window!r} selects no token of row {row}")
    if chosen.min() < 0 or chosen.max() >= length:
        raise AnalysisInputError(f"attention window {window!r} has positions outside 0..{length - 1}")
    return chosen


def _auto_window(layout: "TokenLayout", row: int, patterns: Optional[Tensor], max_tokens: int) -> Tensor:
    length = int(layout.lengths[row])
    if length <= max_tokens:
        return torch.arange(length)
    image = layout.image_mask[row, :length].cpu()
    text = (~image).nonzero().flatten()
    if text.numel() >= max_tokens:
        return text[-max_tokens:]
    img_pos = image.nonzero().flatten()
    room = max_tokens - text.numel()
    if patterns is None:
        # No patterns to rank by: an even sample of the image, in raster order.
        idx = torch.linspace(0, img_pos.numel() - 1, room).round().long().unique()
        keep = img_pos[idx]
    else:
        last_img = int(img_pos.max())
        queries = text[text > last_img]
        if queries.numel() == 0:
            queries = torch.tensor([length - 1])
        received = patterns.float().cpu()[:, :, queries][..., img_pos].mean(dim=(0, 1, 2))
        keep = img_pos[received.topk(min(room, img_pos.numel())).indices]
    return torch.sort(torch.cat([text, keep])).values


def attention_view(
    cache: "VLMCache",
    tokens: Sequence[str],
    *,
    layers: Union[None, int, Sequence[int]] = None,
    heads: Union[None, int, Sequence[int]] = None,
    window: Window = "auto",
    row: int = 0,
    max_tokens: Optional[int] = None,
    id_prefix: str = "vlens-attn",
) -> HTMLView:
    """CircuitsVis attention views of chosen layers of a cached forward pass.

    Args:
        cache: A ``VLMCache`` holding ``blocks.{l}.attn.hook_pattern`` for the layers.
        tokens: ``model.to_str_tokens(inputs, row)``: one string per real token of the
            row, image tokens reading ``<img r,c>`` or ``<q k>``.
        layers: Layer index or indices (default: the middle layer, which renders fast
            and is where text usually reads the image).
        heads: Head index or indices (default: every head).
        window: Which positions to show; see :func:`choose_window`.
        row: Batch row.
        max_tokens: Size limit of the automatic window (default: as many tokens as
            keep layers x heads x tokens^2 near ``DEFAULT_CELL_BUDGET``, between 16
            and 96, so the view renders in a few seconds).
        id_prefix: Fixed prefix of element ids (one view per layer: ``{id_prefix}-L{l}``).

    Returns:
        An ``HTMLView`` (``.to_html()`` for a standalone page, shown inline in notebooks).
    """
    layout = cache.layout
    n_layers = int(cache.model.cfg.n_layers)
    length = int(layout.lengths[row])
    if len(tokens) != length:
        raise AnalysisInputError(
            f"got {len(tokens)} tokens but row {row} has {length} real tokens; pass model.to_str_tokens(inputs, row={row})"
        )
    layer_list = _as_list(layers, default=[n_layers // 2], bound=n_layers, what="layer")
    patterns = []
    for layer in layer_list:
        name = f"blocks.{layer}.attn.hook_pattern"
        if name not in cache:
            raise AnalysisInputError(f"the cache has no {name}; run run_with_cache with names_filter including it")
        patterns.append(cache[name][row, :, :length, :length].float().cpu())
    stacked = torch.stack(patterns)  # layer head q k
    n_heads = stacked.shape[1]
    head_list = _as_list(heads, default=list(range(n_heads)), bound=n_heads, what="head")
    stacked = stacked[:, head_list]
    if max_tokens is None:
        per_view = len(layer_list) * len(head_list)
        max_tokens = max(MIN_AUTO_TOKENS, min(DEFAULT_MAX_TOKENS, int((DEFAULT_CELL_BUDGET / per_view) ** 0.5)))
    positions = choose_window(layout, row, window, stacked, max_tokens)
    window_tokens = [tokens[int(p)] for p in positions.tolist()]
    view = HTMLView("", needs_circuitsvis=True, title="vlens attention")
    for i, layer in enumerate(layer_list):
        sub = stacked[i][:, positions][:, :, positions]
        view = view + attention_heads_view(
            sub,
            window_tokens,
            head_names=[f"L{layer}H{h}" for h in head_list],
            element_id=f"{id_prefix}-L{layer}",
            title=f"Layer {layer}: {len(head_list)} heads, {positions.numel()} of {length} tokens",
        )
    return view


def _as_list(value: Union[None, int, Sequence[int]], default: list[int], bound: int, what: str) -> list[int]:
    if value is None:
        return default
    items = [value] if isinstance(value, int) else [int(v) for v in value]
    if not items:
        raise AnalysisInputError(f"no {what} selected")
    bad = [v for v in items if not 0 <= v < bound]
    if bad:
        raise AnalysisInputError(f"{what}(s) {bad} out of range: this model has {bound} ({what}s 0..{bound - 1})")
    return list(dict.fromkeys(items))
