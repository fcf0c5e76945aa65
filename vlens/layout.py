"""Where the image tokens are: ``TokenLayout`` and ``ImageSpan``.

Everything downstream of ``HookedVLM.prepare`` indexes image and text tokens through a
``TokenLayout``; nothing else in vlens counts tokens. A family adapter builds the
``ImageSpan`` s of each batch row from the processor's output (that is the one tested
place that knows a family's token arithmetic), and :func:`assemble_layout` derives the
masks every analysis uses from them.

Conventions:
    * Positions are sequence indices into the (right-padded) batch, so a token's
      position is the same whether its example is run alone or in a batch.
    * ``tile`` numbers the sub-images of an image: ``0`` is the whole (base or global)
      image, ``1..T`` are high-resolution crops in row-major order, ``-1`` marks a
      separator token the vision stack inserts (e.g. a newline token after each grid row).
    * ``row_col`` is a token's (row, column) in its own tile's grid, ``-1`` where a
      token has no place on a grid (separators, CLS tokens, query tokens of a connector
      that makes a fixed number of learned queries).
    * ``boxes`` is each token's pixel box on the input image, as the family adapter states
      it (``VisionPrefixAdapter.token_boxes``), NaN where a token covers no region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens.errors import PromptError


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """The tokens one image became in one batch row.

    Attributes:
        image_index: Index of the image among the images of its row.
        positions: Sequence positions of the image's tokens, ascending.
        tile: Sub-image of each token (see the module docstring).
        row_col: (row, column) of each token in its tile's grid, -1 where none.
        tile_grids: Grid shape (rows, cols) of each tile id present; empty for
            query-token images, whose tokens have no grid.
        labels: Readable label of each token, e.g. ``"<img 3,4>"`` or ``"<q 7>"``.
        query_attention: For query-token images, where each query token looks: its
            cross-attention over the vision encoder's patch grid, averaged over the
            connector's layers and heads, ``[n, rows, cols]``. None otherwise.
        connector_text: The instruction text the connector read, for a connector that
            reads one (so these visual tokens depend on it). None where it reads no text.
        query_label: What figures call this span's tokens when they have no grid (the
            family's name for its query tokens); None for "query tokens".
        boxes: Each token's pixel box (x0, y0, x1, y1) on the input image, NaN where it
            covers none (``HookedVLM.prepare`` fills it from the family adapter); None
            for a span built without an image.
        marker_positions: Positions of text tokens that delimit this image's rows (e.g.
            Pixtral's ``[IMG_BREAK]`` / ``[IMG_END]``): not image tokens (they are in the
            layout's ``marker_mask``), but labelled like newline tokens (``marker_labels``).
        marker_labels: The label of each of ``marker_positions``, e.g. ``"<nl 0>"``.
    """

    image_index: int
    positions: Int[Tensor, " n"]
    tile: Int[Tensor, " n"]
    row_col: Int[Tensor, "n 2"]
    tile_grids: dict[int, tuple[int, int]]
    labels: tuple[str, ...]
    query_attention: Optional[Float[Tensor, "n rows cols"]] = None
    connector_text: Optional[str] = None
    query_label: Optional[str] = None
    boxes: Optional[Float[Tensor, "n 4"]] = None
    marker_positions: Optional[Int[Tensor, " m"]] = None
    marker_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.positions.shape[0]
        if not (self.tile.shape[0] == self.row_col.shape[0] == len(self.labels) == n):
            raise ValueError(
                f"ImageSpan fields disagree in length: positions {n}, tile {self.tile.shape[0]}, "
                f"row_col {self.row_col.shape[0]}, labels {len(self.labels)}"
            )
        if self.boxes is not None and tuple(self.boxes.shape) != (n, 4):
            raise ValueError(f"ImageSpan.boxes must be [{n}, 4], got {tuple(self.boxes.shape)}")
        n_markers = 0 if self.marker_positions is None else int(self.marker_positions.shape[0])
        if n_markers != len(self.marker_labels):
            raise ValueError(f"ImageSpan has {n_markers} marker positions but {len(self.marker_labels)} marker labels")

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def grid(self) -> Optional[tuple[int, int]]:
        """(rows, cols) of the whole image's grid (tile 0); None for query tokens."""
        return self.tile_grids.get(0)

    @property
    def tokens_name(self) -> str:
        """What figures call tokens of this span that have no grid (see ``query_label``)."""
        return self.query_label or "query tokens"

    @property
    def on_grid(self) -> Bool[Tensor, " n"]:
        """Tokens of tile 0 that sit on its grid (the ones a heatmap of the image shows)."""
        return (self.tile == 0) & (self.row_col[:, 0] >= 0)

    def to_grid(self, values: Float[Tensor, " n"]) -> Float[Tensor, "rows cols"]:
        """Lay one value per token of this span out on the image's patch grid.

        For grid images, the tile-0 tokens are placed at their (row, col); cells no
        token covers are NaN. For query-token images each query token's value is spread
        over the patches it attends to (``query_attention``), so the map shows where
        on the image the value lives: ``sum_k values[k] * attn[k] / sum_k attn[k]``.

        Raises:
            ValueError: if ``values`` does not have one entry per token, or the span
                has neither a grid nor query attention.
        """
        values = torch.as_tensor(values, dtype=torch.float32).cpu()
        if values.shape != (self.n_tokens,):
            raise ValueError(f"expected one value per image token ({self.n_tokens}), got shape {tuple(values.shape)}")
        if self.grid is not None:
            rows, cols = self.grid
            out = torch.full((rows, cols), float("nan"))
            keep = self.on_grid
            rc = self.row_col[keep]
            out[rc[:, 0], rc[:, 1]] = values[keep]
            return out
        if self.query_attention is not None:
            attn = self.query_attention.float().cpu()
            weighted = torch.einsum("k,krc->rc", values, attn)
            return weighted / attn.sum(0).clamp_min(1e-12)
        raise ValueError("this image span has no grid and no query attention to lay values out on")


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Which positions of a (right-padded) batch are image, prompt and answer tokens.

    Attributes:
        images: Per batch row, the spans of its images, in order.
        attention_mask: True at real (non-padding) tokens.
        image_mask: True at every token the vision stack produced (the image
            placeholder positions, separators included).
        marker_mask: True at text tokens that only delimit images (start- and
            end-of-image markers, crop tags; the adapter's ``marker_ids``).
        prefix_mask: Text before the first image (system prompt, ``USER:``).
        instruction_mask: Text after the last image, up to the answer.
        answer_mask: The answer's tokens (all False when no answer was given).
        answer_start: First answer position per row (the row length when none).
        lengths: Number of real tokens per row.
    """

    images: tuple[tuple[ImageSpan, ...], ...]
    attention_mask: Bool[Tensor, "batch pos"]
    image_mask: Bool[Tensor, "batch pos"]
    marker_mask: Bool[Tensor, "batch pos"]
    prefix_mask: Bool[Tensor, "batch pos"]
    instruction_mask: Bool[Tensor, "batch pos"]
    answer_mask: Bool[Tensor, "batch pos"]
    answer_start: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def text_mask(self) -> Bool[Tensor, "batch pos"]:
        """Real tokens that are not image tokens (markers included)."""
        return self.attention_mask & ~self.image_mask

    @property
    def has_answer(self) -> bool:
        return bool(self.answer_mask.any())

    def image_positions(self, row: int = 0) -> Int[Tensor, " n"]:
        """All image-token positions of one row, every image concatenated."""
        return self.image_mask[row].nonzero().flatten()

    def mask(self, name: str) -> Bool[Tensor, "batch pos"]:
        """A segment mask by name: image, text, prefix, instruction, answer, marker, real,
        or last (the last real token of each row)."""
        if name == "last":
            out = torch.zeros_like(self.attention_mask)
            out[torch.arange(self.batch_size), self.lengths - 1] = True
            return out
        masks = {
            "image": self.image_mask,
            "text": self.text_mask,
            "prefix": self.prefix_mask,
            "instruction": self.instruction_mask,
            "answer": self.answer_mask,
            "marker": self.marker_mask,
            "real": self.attention_mask,
        }
        if name not in masks:
            raise ValueError(f"unknown segment {name!r}; choose one of {sorted([*masks, 'last'])}")
        return masks[name]

    def token_labels(self, row: int, text_tokens: list[str]) -> list[str]:
        """Per-position labels of one row: image tokens read their span label, and so do a
        span's row markers (``marker_labels``); the rest keep ``text_tokens`` (the
        tokenizer's strings); padding is dropped."""
        labels = list(text_tokens[: int(self.lengths[row])])
        for span in self.images[row]:
            for pos, label in zip(span.positions.tolist(), span.labels):
                labels[pos] = label
            if span.marker_positions is not None:
                for pos, label in zip(span.marker_positions.tolist(), span.marker_labels):
                    labels[pos] = label
        return labels

    def select(self, rows: list[int]) -> "TokenLayout":
        """The layout of a subset of rows (padding width unchanged)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return TokenLayout(
            images=tuple(self.images[r] for r in rows),
            attention_mask=self.attention_mask[idx],
            image_mask=self.image_mask[idx],
            marker_mask=self.marker_mask[idx],
            prefix_mask=self.prefix_mask[idx],
            instruction_mask=self.instruction_mask[idx],
            answer_mask=self.answer_mask[idx],
            answer_start=self.answer_start[idx],
            lengths=self.lengths[idx],
            extras=self.extras,
        )


def grid_span(
    image_index: int,
    positions: Int[Tensor, " n"],
    rows: int,
    cols: int,
    label: str = "img",
    leading_cls: bool = False,
) -> ImageSpan:
    """A span for an image that became one raster-ordered grid (optionally after a CLS token)."""
    n_expected = rows * cols + int(leading_cls)
    if positions.shape[0] != n_expected:
        raise PromptError(
            f"image {image_index} has {positions.shape[0]} placeholder tokens but its grid "
            f"{rows}x{cols}{' plus CLS' if leading_cls else ''} needs {n_expected}"
        )
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    row_col = torch.stack([r, c], dim=1)
    labels = [f"<{label} {i},{j}>" for i, j in zip(r.tolist(), c.tolist())]
    tile = torch.zeros(rows * cols, dtype=torch.long)
    if leading_cls:
        row_col = torch.cat([torch.full((1, 2), -1), row_col])
        tile = torch.cat([torch.zeros(1, dtype=torch.long), tile])
        labels = [f"<{label} cls>", *labels]
    return ImageSpan(
        image_index=image_index,
        positions=positions,
        tile=tile,
        row_col=row_col,
        tile_grids={0: (rows, cols)},
        labels=tuple(labels),
    )


def contiguous_runs(positions: Int[Tensor, " n"]) -> list[Int[Tensor, " m"]]:
    """Split ascending positions into runs of consecutive integers."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def assemble_layout(
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    image_token_id: int,
    images: list[list[ImageSpan]],
    answer_start: list[int],
    marker_ids: frozenset[int] = frozenset(),
    extras: Optional[dict] = None,
) -> TokenLayout:
    """Derive every mask of a ``TokenLayout`` from spans the family adapter built.

    Checks that the spans cover exactly the image placeholder positions, so an adapter
    that miscounts fails here rather than mislabelling tokens downstream.
    """
    input_ids = input_ids.cpu()
    real = attention_mask.cpu().bool()
    batch, seq = input_ids.shape
    image_mask = (input_ids == image_token_id) & real
    for b in range(batch):
        covered = torch.zeros(seq, dtype=torch.bool)
        for span in images[b]:
            covered[span.positions] = True
        if not torch.equal(covered, image_mask[b]):
            raise PromptError(
                f"row {b}: the image spans cover {int(covered.sum())} positions but the prompt has "
                f"{int(image_mask[b].sum())} image placeholder tokens"
            )
    marker_mask = torch.zeros_like(image_mask)
    for marker in marker_ids:
        marker_mask |= input_ids == marker
    marker_mask &= real
    lengths = real.sum(1)
    pos = torch.arange(seq).unsqueeze(0)
    starts = torch.as_tensor(answer_start, dtype=torch.long).unsqueeze(1)
    answer_mask = (pos >= starts) & real
    has_image = image_mask.any(1, keepdim=True)
    first_img = torch.where(has_image, image_mask.float().argmax(1, keepdim=True), torch.full_like(starts, seq))
    last_img = torch.where(
        has_image, seq - 1 - image_mask.flip(1).float().argmax(1, keepdim=True), torch.full_like(starts, -1)
    )
    text = real & ~image_mask & ~marker_mask
    prefix_mask = text & (pos < first_img)
    instruction_mask = text & (pos > last_img) & (pos < starts)
    return TokenLayout(
        images=tuple(tuple(spans) for spans in images),
        attention_mask=real,
        image_mask=image_mask,
        marker_mask=marker_mask,
        prefix_mask=prefix_mask,
        instruction_mask=instruction_mask,
        answer_mask=answer_mask,
        answer_start=starts.flatten(),
        lengths=lengths,
        extras=dict(extras or {}),
    )
