"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``): crops plus a global image.

The image processor resizes an image (longest edge to ``size["longest_edge"]``), rounds
it up to whole crops of the vision tower's input size and cuts it into ``rows x cols``
crops, then adds the whole image resized to one crop (the *global* image). Every crop
goes through the SigLIP-style tower; the connector's pixel shuffle folds each
``scale_factor x scale_factor`` block of patches into one token, so a crop becomes a
``g x g`` grid (``g = image_size // patch_size // scale_factor``) in raster order. The
processor writes, per image::

    <fake_token_around_image><row_1_col_1><image>*g² <fake_token_around_image><row_1_col_2>...\\n
    ...
    \\n<fake_token_around_image><global-img><image>*g²<fake_token_around_image>

(an image that needs no split is only the global part). In the layout, tile 0 is the
global image and tiles ``1..rows*cols`` the crops in row-major order, numbered from the
``<row_i_col_j>`` tag in front of each run; the tags and ``<fake_token_around_image>`` are
markers.

Contract: a 1-D causal Llama language model with no per-token inputs. A crop token's box is
its cell of its crop, mapped back through the resizes; a global-image token's box is its
cell of the whole image (squashed to one crop).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import BatchFeature

from vlens.adapters._geometry import Frame, cell_boxes, clip_to_image, size_get
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, contiguous_runs

# TransformerLens's Idefics3 bridge is its Llama bridge re-rooted at model.text_model.
LLAMA_TEXT_MODELS = ("llama",)
_ROW_COL = re.compile(r"^<row_(\d+)_col_(\d+)>$")
GLOBAL_TAG = "<global-img>"
FAKE_TOKEN = "<fake_token_around_image>"
MAX_IMAGE_SIZE = 4096  # transformers' idefics3 image processing: the absolute bound on a side


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after Idefics3's ``resize`` to ``longest_edge`` (mirrors
    ``get_resize_output_image_size``: the long side to the edge, the short side kept in
    ratio and rounded up to even, then both bounded by ``MAX_IMAGE_SIZE``)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def crop_multiple_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """(height, width) rounded up to whole crops (mirrors ``resize_for_vision_encoder``)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / crop) * crop
        height = math.ceil(int(width / aspect) / crop) * crop
    else:
        height = math.ceil(height / crop) * crop
        width = math.ceil(int(height * aspect) / crop) * crop
    return height, width


class Idefics3Adapter(SequentialPositions, VisionPrefixAdapter):
    """Idefics3 / SmolVLM: SigLIP crops and a global image, pixel-shuffled, between markers."""
    family = "idefics3"
    hf_architectures = ("Idefics3ForConditionalGeneration",)
    vision_model_types: ClassVar[tuple[str, ...]] = ("idefics3_vision",)
    """The ``vision_config.model_type`` s of the family's SigLIP-style tower."""
    tl_architecture = "Idefics3ForConditionalGeneration"
    model_input_names = ("pixel_attention_mask",)
    fallback_template = "User:{images}{prompt}<end_of_utterance>\nAssistant:"
    nested_images = True
    per_token_inputs = ()
    causal_over_image = True

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config.vision_config, "model_type", cls.vision_model_types, cls.family, where="config.vision_config")
        expect(config.text_config, "model_type", LLAMA_TEXT_MODELS, cls.family, where="config.text_config")
        vision = config.vision_config
        size, patch, scale = vision.image_size, vision.patch_size, config.scale_factor
        if not all(isinstance(v, int) for v in (size, patch, scale)):
            raise UnsupportedArchitectureError(
                f"{cls.family}: vision_config.image_size={size!r}, patch_size={patch!r} and scale_factor={scale!r} must "
                "be integers (square crops); vlens does not handle rectangular towers"
            )
        if (size // patch) % scale:
            raise UnsupportedArchitectureError(
                f"{cls.family}: a {size}px crop with patch_size {patch} is a {size // patch}x{size // patch} patch grid, "
                f"which pixel shuffle with scale_factor {scale} cannot fold evenly; vlens needs "
                "(image_size // patch_size) divisible by scale_factor"
            )

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        vocab = self.tokenizer.get_vocab()
        self._row_col_of: dict[int, tuple[int, int]] = {}
        for token, token_id in vocab.items():
            match = _ROW_COL.match(token)
            if match:
                self._row_col_of[token_id] = (int(match.group(1)), int(match.group(2)))
        splits = getattr(getattr(processor, "image_processor", None), "do_image_splitting", True)
        if splits and not self._row_col_of:
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor splits images into crops but the tokenizer has no <row_i_col_j> "
                "tokens; vlens reads which crop each run of image tokens is from these tags"
            )
        # The processor adds <fake_token_around_image> itself; <global-img> is one token in
        # SmolVLM / Idefics3 tokenizers (and, if some tokenizer splits it, its pieces stay text).
        self._markers = frozenset(
            {int(vocab[t]) for t in (GLOBAL_TAG, FAKE_TOKEN) if t in vocab} | set(self._row_col_of)
        )
        max_size = getattr(getattr(processor, "image_processor", None), "max_image_size", None)
        crop = max_size.get("longest_edge") if isinstance(max_size, dict) else getattr(max_size, "longest_edge", None)
        if crop is not None and crop != config.vision_config.image_size:
            raise UnsupportedArchitectureError(
                f"{self.family}: the image processor cuts {crop}px crops (max_image_size) but the vision tower takes "
                f"{config.vision_config.image_size}px images (vision_config.image_size); this checkpoint's processor "
                "and model disagree"
            )

    @property
    def tile_side(self) -> int:
        """Side of the token grid of one crop (or of the global image) after pixel shuffle."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size // self.config.scale_factor

    def marker_ids(self) -> frozenset[int]:
        return self._markers

    # ---- pixel geometry ----------------------------------------------------------------

    def sub_image_frames(self, width: int, height: int) -> tuple[Frame, list[Frame]]:
        """The frames of the global image and of each crop (row-major) of a ``width x height``
        image, following ``Idefics3ImageProcessor._preprocess``."""
        ip = self.processor.image_processor
        crop = self.config.vision_config.image_size  # max_image_size, checked equal in __init__
        frame = Frame(float(width), float(height))
        if getattr(ip, "do_resize", False):
            edge = size_get(ip.size, "longest_edge")
            size_h, size_w = size_get(ip.size, "height"), size_get(ip.size, "width")
            if edge is not None:
                h, w = longest_edge_size(height, width, edge)
            elif size_h and size_w:
                h, w = size_h, size_w
            else:
                raise UnsupportedArchitectureError(f"{self.family}: image processor size {ip.size!r} is not supported")
            frame = frame.resize(w, h)
        if not getattr(ip, "do_image_splitting", False):
            return frame.resize(crop, crop), []
        h, w = crop_multiple_size(int(frame.height), int(frame.width), crop)
        frame = frame.resize(w, h)
        if h <= crop and w <= crop:
            return frame, []
        crops = [frame.crop(j * crop, i * crop, crop, crop) for i in range(h // crop) for j in range(w // crop)]
        return frame.resize(crop, crop), crops

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        whole, crops = self.sub_image_frames(width, height)
        if len(span.tile_grids) != len(crops) + 1:
            raise UnsupportedArchitectureError(
                f"{self.family}: a {width}x{height} image is cut into {len(crops)} crops, its span has "
                f"{len(span.tile_grids) - 1}"
            )
        cell = self.config.vision_config.patch_size * self.config.scale_factor  # one pixel-shuffled token
        boxes = torch.full((span.n_tokens, 4), float("nan"))
        for t, frame in enumerate([whole, *crops]):
            mine = span.tile == t
            boxes[mine] = frame.to_original(cell_boxes(span.row_col[mine], cell))
        return clip_to_image(boxes, width, height)

    def scene_geometry(self) -> SceneGeometry:
        # Whatever crops the processor cuts from a square scene, its global image is the whole
        # scene resized to one crop, so the global grid's cells are the scene's cells.
        g = self.tile_side
        cell = self.config.vision_config.patch_size * self.config.scale_factor
        return SceneGeometry(image_size=g * cell, patch_size=cell, token_grid=(g, g))

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        # pixel_attention_mask is optional in HF's forward (all-ones when absent).
        return {name: batch[name] for name in self.model_input_names if name in batch}

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        ids = batch["input_ids"][row]
        g = self.tile_side
        spans: list[ImageSpan] = []
        crops: list[tuple[tuple[int, int], torch.Tensor]] = []
        for run in contiguous_runs(positions):
            start = int(run[0])
            tag = int(ids[start - 1]) if start > 0 else None
            where = f"row {row}, image tokens at {start}..{int(run[-1])}"
            if run.shape[0] != g * g:
                raise PromptError(
                    f"{where}: {run.shape[0]} image tokens, but each crop and the global image become "
                    f"{g}x{g} = {g * g} tokens for this config (image_size // patch_size // scale_factor = {g}); "
                    "the processor's image_seq_len disagrees with the model config"
                )
            if tag in self._row_col_of:
                crops.append((self._row_col_of[tag], run))
            else:  # after <global-img>: the global image closes the image
                spans.append(self._image_span(len(spans), crops, run, where))
                crops = []
        if crops:
            raise PromptError(f"row {row}: {len(crops)} crop(s) at the end have no global image after them")
        self._check_pixel_count(batch, row, spans)
        return spans

    def _image_span(
        self, index: int, crops: list[tuple[tuple[int, int], torch.Tensor]], global_run: torch.Tensor, where: str
    ) -> ImageSpan:
        g = self.tile_side
        n_rows = max((rc[0] for rc, _ in crops), default=0)
        n_cols = max((rc[1] for rc, _ in crops), default=0)
        expected = [(i, j) for i in range(1, n_rows + 1) for j in range(1, n_cols + 1)]
        if [rc for rc, _ in crops] != expected:
            raise PromptError(
                f"{where}: image {index}'s crop tags {[rc for rc, _ in crops]} are not a full {n_rows}x{n_cols} grid "
                "in row-major order"
            )
        r = torch.arange(g).repeat_interleave(g)
        c = torch.arange(g).repeat(g)
        grid_rc = torch.stack([r, c], dim=1)
        positions, tiles, row_cols, labels = [], [], [], []
        # Tokens in sequence order: the crops first, then the global image (tile 0).
        for t, (_, run) in enumerate(crops, start=1):
            positions.append(run)
            tiles.append(torch.full((g * g,), t, dtype=torch.long))
            row_cols.append(grid_rc)
            labels += [f"<t{t} {i},{j}>" for i, j in zip(r.tolist(), c.tolist())]
        positions.append(global_run)
        tiles.append(torch.zeros(g * g, dtype=torch.long))
        row_cols.append(grid_rc)
        labels += [f"<img {i},{j}>" for i, j in zip(r.tolist(), c.tolist())]
        return ImageSpan(
            image_index=index,
            positions=torch.cat(positions),
            tile=torch.cat(tiles),
            row_col=torch.cat(row_cols),
            tile_grids={t: (g, g) for t in range(len(crops) + 1)},
            labels=tuple(labels),
        )

    def _check_pixel_count(self, batch: BatchFeature, row: int, spans: list[ImageSpan]) -> None:
        """The row's sub-images in ``pixel_values`` (padding images are all zero, as HF
        tells them apart) must be as many as the layout's tiles."""
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            if spans:
                raise PromptError(f"row {row}: the prompt has image tokens but the processor returned no pixel_values")
            return
        per_image = pixel_values[row].flatten(1)
        n_real = int((per_image != 0).any(dim=1).sum())
        n_tiles = sum(len(span.tile_grids) for span in spans)
        if n_real != n_tiles:
            raise PromptError(
                f"row {row}: the image tokens describe {n_tiles} crops and global images, but pixel_values holds "
                f"{n_real} real sub-images"
            )
