"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres_max tiles, newlines.

An image alone in its prompt is tiled as in LLaVA-NeXT (``vlens.adapters._anyres``): the
base grid first, then the unpadded high-resolution crops read row by row, each canvas row
followed by one ``image_newline`` token, all under the ``<image>`` placeholder. Two rules
are OneVision's own:

- ``vision_aspect_ratio = "anyres_max_N"``: where the unpadded canvas holds more than about
  N tiles' worth of patches (``sqrt(h*w / (N*g*g)) > 1.1``), the model resamples it
  bilinearly to ``int(h / ratio) x int(w / ratio)``; those tokens form one tile (1), each
  with the canvas region it was resampled from as its box.
- An image in a prompt with several images (the processor's ``batch_num_images`` > 1) is
  not tiled: the image padded to a square and resized to one crop gives the base grid,
  followed by a single newline token.

So two images of different aspect ratios become different numbers of tokens, and an image
becomes fewer tokens beside a second image than alone.

Contract: a 1-D causal Qwen2 (Llama-style) language model with no per-token inputs; boxes
as in ``AnyresAdapter``, and for an untiled image its patch of the padded square.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from transformers import BatchFeature

from vlens.adapters._anyres import AnyresAdapter, check_pinpoints, check_tower_strategy
from vlens.adapters._geometry import Frame
from vlens.adapters.base import expect
from vlens.adapters.llava import LLAMA_STYLE_TEXT_MODELS
from vlens.errors import UnsupportedArchitectureError

ASPECT_RATIO = re.compile(r"anyres_max_([1-9][0-9]*)")


class LlavaOnevisionAdapter(AnyresAdapter):
    """LLaVA-OneVision: SigLIP crops of anyres_max, newline tokens, one grid per image of a multi-image prompt."""
    family = "llava_onevision"
    hf_architectures = ("LlavaOnevisionForConditionalGeneration",)
    tl_architecture = "LlavaOnevisionForConditionalGeneration"
    model_input_names = ("image_sizes", "batch_num_images")
    video_processor_class = "LlavaOnevisionProcessor"
    nested_images = True  # the processor counts images per prompt (batch_num_images) from the nesting

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config, "vision_feature_select_strategy", ("default", "full"), cls.family)
        towers = ("siglip_vision_model", "clip_vision_model")
        expect(config.vision_config, "model_type", towers, cls.family, where="config.vision_config")
        # TransformerLens's OneVision bridge is its LLaVA bridge: a Llama-style (Qwen2) text tower.
        expect(config.text_config, "model_type", LLAMA_STYLE_TEXT_MODELS, cls.family, where="config.text_config")
        check_tower_strategy(config, cls.family)
        check_pinpoints(config, cls.family)
        ratio = getattr(config, "vision_aspect_ratio", None)
        if not (isinstance(ratio, str) and ASPECT_RATIO.fullmatch(ratio)):
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.vision_aspect_ratio = {ratio!r} is not supported; vlens handles "
                "'anyres_max_N' with N a positive whole number (released checkpoints: 'anyres_max_9')"
            )
        layer = getattr(config, "vision_feature_layer", None)
        if not isinstance(layer, int):
            raise UnsupportedArchitectureError(
                f"{cls.family}: config.vision_feature_layer = {layer!r} is not supported; vlens handles one layer "
                "(an int, e.g. -1 as in the released checkpoints)"
            )

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        # The processor counts the placeholders, the model the features: both must tile alike.
        said = getattr(processor, "vision_aspect_ratio", None)
        if said != config.vision_aspect_ratio:
            raise UnsupportedArchitectureError(
                f"{self.family}: the processor's vision_aspect_ratio {said!r} differs from the model config's "
                f"{config.vision_aspect_ratio!r}, so they disagree on how many tokens an image becomes"
            )
        g = config.vision_config.image_size // config.vision_config.patch_size
        if getattr(processor, "num_image_tokens", None) != g * g:
            raise UnsupportedArchitectureError(
                f"{self.family}: the processor's num_image_tokens {getattr(processor, 'num_image_tokens', None)!r} "
                f"is not the tower's {g}x{g} = {g * g} patches per crop"
            )

    def max_crops(self) -> Optional[int]:
        match = ASPECT_RATIO.fullmatch(self.config.vision_aspect_ratio)
        assert match is not None  # check_config refused anything else
        return int(match.group(1))

    def tiled_images(self, batch: BatchFeature) -> list[bool]:
        """An image is tiled when it is the only image of its prompt (``batch_num_images`` counts
        the images of each prompt that has any, in order, as the model's own forward reads it)."""
        per_prompt = batch.get("batch_num_images")
        n_images = int(batch["image_sizes"].shape[0])
        if per_prompt is None:  # flat images: Hugging Face tiles every one
            return [True] * n_images
        counts = [int(n) for n in per_prompt]
        if sum(counts) != n_images:
            raise UnsupportedArchitectureError(
                f"{self.family}: batch_num_images {counts} does not add up to the {n_images} images of the batch"
            )
        return [n == 1 for n in counts for _ in range(n)]

    def untiled_frame(self, width: int, height: int) -> Frame:
        # pad_to_square: centred, the short side's start at (side - size) // 2; then resized to one crop.
        side = max(width, height)
        square = Frame(float(width), float(height)).pad((side - width) // 2, (side - height) // 2, side, side)
        return self._finish(square)
