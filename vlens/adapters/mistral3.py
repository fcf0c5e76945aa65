"""Mistral3 / Pixtral (``Mistral3ForConditionalGeneration``): each image on its own grid, row markers.

The Pixtral image processor resizes each image on its own: scaled down (never up) so that
its longest edge fits ``size["longest_edge"]``, then stretched to whole numbers of
``patch_size * spatial_merge_size`` pixels (rounding each side up). A batch pads the pixel
tensors to its largest image (bottom and right); ``image_sizes`` holds each image's real
(resized) size, and the Pixtral tower reads only that part. The projector merges
``spatial_merge_size x spatial_merge_size`` patches into one token, so an image's token grid
is ``image_sizes // (patch_size * spatial_merge_size)``, in raster order.

The processor writes each grid row's ``[IMG]`` tokens followed by ``[IMG_BREAK]``, and
``[IMG_END]`` instead of the last row's break. Those two are text tokens the language model
embeds from its vocabulary, not image positions: the layout's image mask holds the ``[IMG]``
tokens only, the markers are in its ``marker_mask`` (neither prefix nor instruction), and
they are labelled like LLaVA-NeXT's newline tokens: ``<nl r>`` after grid row r (the
``[IMG_END]`` included, which ends the last row).

TransformerLens's Mistral3 bridge wraps the Pixtral tower as one opaque component; vlens maps
its patch convolution, first norm and layers onto TransformerLens components
(``vlens.adapters._pixtral_bridge``), so per-layer vision hooks fire (residual stream,
attention and MLP outputs, norms); Pixtral's attention weights have no hook. See
docs/models.md.

Contract: a 1-D causal Mistral (Llama-style) language model with no per-token inputs. A
token's box is its merged cell of the resized image mapped back through the resize.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature

from vlens.adapters._geometry import Frame, cell_boxes, clip_to_image, size_get
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.adapters.llava import LLAMA_STYLE_TEXT_MODELS
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, grid_span

SCENE_TOKENS_PER_SIDE = 24
"""Side, in tokens, of the square synthetic scenes (at most the processor's longest edge):
24 x 24 = 576 tokens as in LLaVA-1.5, rather than the thousands a full-size image becomes."""


class Mistral3Adapter(SequentialPositions, VisionPrefixAdapter):
    """Mistral 3 (Pixtral tower, patch merger, Mistral language model): one grid per image at its own size."""
    family = "mistral3"
    hf_architectures = ("Mistral3ForConditionalGeneration",)
    tl_architecture = "Mistral3ForConditionalGeneration"
    model_input_names = ("image_sizes",)
    # Not a video part: transformers offers PixtralProcessor only with torchvision (vlens.adapters._processors).
    video_processor_class = "PixtralProcessor"
    per_token_inputs = ()
    causal_over_image = True

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config.vision_config, "model_type", ("pixtral",), cls.family, where="config.vision_config")
        # TransformerLens's Mistral3 bridge is its LLaVA bridge: a Llama-style (Mistral) text tower.
        expect(config.text_config, "model_type", LLAMA_STYLE_TEXT_MODELS, cls.family, where="config.text_config")
        layer = getattr(config, "vision_feature_layer", None)
        if not isinstance(layer, int):
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.vision_feature_layer = {layer!r} is not supported; vlens handles one layer "
                "(an int, e.g. -1 as in the released checkpoints)"
            )
        merge = getattr(config, "spatial_merge_size", None)
        if not (isinstance(merge, int) and merge >= 1):
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.spatial_merge_size = {merge!r} is not supported; vlens handles a positive int"
            )

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        said = (getattr(processor, "patch_size", None), getattr(processor, "spatial_merge_size", None))
        wanted = (config.vision_config.patch_size, config.spatial_merge_size)
        if said != wanted:
            raise UnsupportedArchitectureError(
                f"{self.family}: the processor's (patch_size, spatial_merge_size) {said} differs from the model's "
                f"{wanted}, so they disagree on how many tokens an image becomes"
            )
        tokenizer = self.tokenizer
        self.break_token_id = int(tokenizer.convert_tokens_to_ids(processor.image_break_token))
        self.end_token_id = int(tokenizer.convert_tokens_to_ids(processor.image_end_token))
        if len({self.image_token_id, self.break_token_id, self.end_token_id, tokenizer.unk_token_id}) != 4:
            raise UnsupportedArchitectureError(
                f"{self.family}: the tokenizer does not give {processor.image_token!r}, "
                f"{processor.image_break_token!r} and {processor.image_end_token!r} tokens of their own"
            )
        ip = processor.image_processor
        if getattr(ip, "do_center_crop", False):
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor sets do_center_crop=True; vlens maps token boxes for Pixtral's "
                "resize without cropping"
            )

    def tl_adapter_overlay(self, tl_adapter: Any) -> None:
        # TransformerLens leaves the Pixtral tower opaque; map its layers so vision hooks fire.
        from vlens.adapters._pixtral_bridge import overlay

        overlay(tl_adapter)

    @property
    def cell(self) -> int:
        """Side in pixels of the region one token covers (a merged block of patches)."""
        return int(self.config.vision_config.patch_size) * int(self.config.spatial_merge_size)

    def marker_ids(self) -> frozenset[int]:
        return frozenset({self.break_token_id, self.end_token_id})

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if batch.get("pixel_values") is None:
            return {}  # a text-only batch: HF's forward takes no image_sizes then
        return super().model_extras(batch)

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        sizes = batch["image_sizes"]
        index = self._first_image_of_row(batch, row)
        ids = batch["input_ids"][row]
        spans: list[ImageSpan] = []
        start = 0
        while start < positions.shape[0]:
            if index >= sizes.shape[0]:
                raise PromptError(
                    f"row {row}: the prompt has {positions.shape[0]} image tokens but its images make only {start}"
                )
            rows, cols = self.grid(sizes[index])
            run = positions[start : start + rows * cols]
            span = grid_span(len(spans), run, rows, cols)
            # Each grid row ends in [IMG_BREAK] right after its last [IMG], the last one in [IMG_END].
            ends = run.view(rows, cols)[:, -1] + 1 if run.shape[0] == rows * cols else run[:0]
            expected = torch.full((rows,), self.break_token_id)
            expected[-1] = self.end_token_id
            found = ids[ends.clamp(max=ids.shape[0] - 1)]
            if ends.shape[0] != rows or not torch.equal(found, expected.to(found)):
                raise PromptError(
                    f"row {row}, image {len(spans)} ({int(sizes[index][1])}x{int(sizes[index][0])} px, a {rows}x{cols} "
                    f"grid): its rows of {cols} image tokens are not each followed by [IMG_BREAK] (the last by "
                    "[IMG_END]) as the Pixtral processor writes them"
                )
            labels = tuple(f"<nl {r}>" for r in range(rows))
            spans.append(ImageSpan(
                image_index=span.image_index, positions=span.positions, tile=span.tile, row_col=span.row_col,
                tile_grids=span.tile_grids, labels=span.labels, marker_positions=ends, marker_labels=labels,
            ))
            start += rows * cols
            index += 1
        return spans

    def grid(self, image_size: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of tokens of an image whose resized size is ``image_size`` = (height, width)."""
        height, width = (int(v) for v in image_size)
        if height % self.cell or width % self.cell:
            raise UnsupportedArchitectureError(
                f"{self.family}: an image resized to {width}x{height} px is not a whole number of {self.cell} px "
                "tokens; the processor's patch_size does not match the model's patch_size * spatial_merge_size"
            )
        return height // self.cell, width // self.cell

    def _first_image_of_row(self, batch: BatchFeature, row: int) -> int:
        """Index into ``image_sizes`` of the first image of ``row`` (earlier rows' images come
        first; their image-token counts tell how many each used)."""
        sizes = batch["image_sizes"]
        index = 0
        for earlier in range(row):
            real = batch["attention_mask"][earlier].bool()
            left = int(((batch["input_ids"][earlier] == self.image_token_id) & real).sum())
            while left > 0:
                if index >= sizes.shape[0]:
                    raise PromptError(f"row {earlier}: more image tokens than its images make")
                rows, cols = self.grid(sizes[index])
                left -= rows * cols
                index += 1
            if left < 0:
                raise PromptError(f"row {earlier}: image tokens do not add up to whole images")
        return index

    # ---- pixel geometry ----------------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image processor resizes a ``width x height`` image to; mirrors
        ``image_processing_pil_pixtral.get_resize_output_image_size``: scaled down by
        ``max(h / longest, w / longest)`` when that exceeds 1 (floor), then each side rounded
        up to whole tokens."""
        ip = self.processor.image_processor
        longest = size_get(ip.size, "longest_edge")
        if longest is None or not getattr(ip, "do_resize", True):
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor resizes with size={ip.size!r} (do_resize="
                f"{getattr(ip, 'do_resize', None)}); vlens maps token boxes for {{'longest_edge': n}}"
            )
        ratio = max(height / longest, width / longest)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        cell = self.cell
        return ((height - 1) // cell + 1) * cell, ((width - 1) // cell + 1) * cell

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        new_h, new_w = self.resized_size(width, height)
        if span.grid != (new_h // self.cell, new_w // self.cell):
            raise UnsupportedArchitectureError(
                f"{self.family}: a {width}x{height} image is resized to {new_w}x{new_h} px "
                f"({new_h // self.cell}x{new_w // self.cell} tokens), but its span has grid {span.grid}"
            )
        frame = Frame(float(width), float(height)).resize(new_w, new_h)
        return clip_to_image(frame.to_original(cell_boxes(span.row_col, self.cell)), width, height)

    def scene_geometry(self) -> SceneGeometry:
        longest = size_get(self.processor.image_processor.size, "longest_edge")
        if longest is None or longest < self.cell:
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor's size {self.processor.image_processor.size!r} has no "
                f"longest_edge of at least one {self.cell} px token"
            )
        # A square of whole tokens no larger than longest_edge is neither scaled nor stretched.
        side = min(longest // self.cell, SCENE_TOKENS_PER_SIDE)
        return SceneGeometry(image_size=side * self.cell, patch_size=self.cell, token_grid=(side, side))
