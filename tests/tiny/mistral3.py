"""Tiny Mistral3 checkpoints: Pixtral tower, patch merger, Mistral tower, ``[IMG_BREAK]`` / ``[IMG_END]``.

The Pixtral image processor resizes each image so that its longest edge is at most
``longest_edge`` and both sides are whole numbers of ``patch * spatial_merge`` pixels (14 px
here), keeping its own size: a 61 x 43 photograph becomes 56 x 42 px, a grid of 3 x 4 merged
tokens, each row followed by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` instead.

The processor is ``PixtralProcessor``, which transformers offers only with torchvision;
``vlens.adapters._processors.processor_class`` gives the real class without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
)

from tests.tiny import word_tokenizer
from tests.tiny.llava import CHAT_TEMPLATE
from vlens.adapters._processors import processor_class

IMAGE_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


def build_mistral3(
    out: Path,
    longest_edge: int = 56,
    patch: int = 7,
    merge: int = 2,
    n_kv_heads: int = 2,
    seed: int = 0,
    save_model: bool = True,
    config_overrides: Optional[dict] = None,
) -> Path:
    """Write a tiny random Mistral3 (model, word-level tokenizer, Pixtral processor) to ``out``.

    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(specials=["[IMG_BREAK]", "[IMG_END]"], image_token="[IMG]")
    # Pixtral's chat template puts [IMG] where an image goes, like <image> in the LLaVA template.
    template = CHAT_TEMPLATE.replace("<image> ", "[IMG] ")
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
        image_size=longest_edge, patch_size=patch,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=8, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None,
    )
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=merge, vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
        **(config_overrides or {}),
    )
    config.architectures = ["Mistral3ForConditionalGeneration"]
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": longest_edge}, patch_size={"height": patch, "width": patch},
    )
    processor = processor_class("PixtralProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, spatial_merge_size=merge,
        chat_template=template, **IMAGE_TOKENS,
    )
    if save_model:
        Mistral3ForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
