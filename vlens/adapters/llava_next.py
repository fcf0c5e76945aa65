"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): base image, anyres tiles, newlines.

The image processor picks the best of ``image_grid_pinpoints`` for the image's size,
resizes the image into that canvas (padding the short side), cuts it into
``tiles_h x tiles_w`` crops of the vision tower's input size, and also sends the whole
image resized to one crop (the *base* image). Hugging Face's ``pack_image_features``
then places, for each image:

1. the base image's patch grid (``g x g`` tokens, ``g = image_size // patch_size``);
2. the crops' patches stitched into one ``tiles_h*g x tiles_w*g`` canvas, with the
   padding rows (or columns) cut off again (``unpad_image``), read row by row, each
   canvas row followed by one ``image_newline`` token.

In the layout, tile 0 is the base image, tiles ``1..tiles_h*tiles_w`` are the crops in
row-major order and newline tokens have tile -1. A crop's grid is the part of it that
survives unpadding, so each tile id has exactly ``rows * cols`` tokens. The tiling, the
layout and the pixel geometry are shared with LLaVA-OneVision (``vlens.adapters._anyres``).

Contract: a 1-D causal Llama-style language model with no per-token inputs. A base-image
token's box is its patch of the whole image (squashed to one crop); a crop token's box is
its patch of the padded canvas mapped back through the padding and the aspect-preserving
resize; newline tokens have none.
"""

from __future__ import annotations

from typing import Any

from vlens.adapters._anyres import (
    AnyresAdapter,
    AnyresCanvas,
    anyres_canvas,
    check_pinpoints,
    check_tower_strategy,
    patch_output_size,
)
from vlens.adapters.base import expect
from vlens.adapters.llava import LLAMA_STYLE_TEXT_MODELS

__all__ = ["AnyresCanvas", "LlavaNextAdapter", "anyres_canvas", "patch_output_size"]


class LlavaNextAdapter(AnyresAdapter):
    """LLaVA-NeXT: anyres, a base grid and unpadded high-resolution tiles with newline tokens."""
    family = "llava_next"
    hf_architectures = ("LlavaNextForConditionalGeneration",)
    tl_architecture = "LlavaNextForConditionalGeneration"
    model_input_names = ("image_sizes",)
    fallback_template = "USER: {images}\n{prompt} ASSISTANT:"

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config, "vision_feature_select_strategy", ("default", "full"), cls.family)
        towers = ("clip_vision_model", "siglip_vision_model")
        expect(config.vision_config, "model_type", towers, cls.family, where="config.vision_config")
        # TransformerLens's LLaVA-NeXT bridge is its LLaVA bridge: a Llama-style text tower.
        expect(config.text_config, "model_type", LLAMA_STYLE_TEXT_MODELS, cls.family, where="config.text_config")
        check_tower_strategy(config, cls.family)
        check_pinpoints(config, cls.family)
