"""Tiny LLaVA-NeXT checkpoints: CLIP or SigLIP tower, anyres tiles, ``image_newline``, Llama tower.

With ``image_size=28`` and ``patch=7`` every tile is a 4 x 4 grid of patches. The default
``image_grid_pinpoints`` offer 1 x 2, 2 x 1 and 2 x 2 tile canvases (in pixels: 28 x 56,
56 x 28, 56 x 56), so a 61 x 43 photograph lands on the 2 x 2 canvas (8 x 8 patches) and
unpadding drops whole patch rows from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    SiglipVisionConfig,
)

from tests.tiny import word_tokenizer
from tests.tiny.llava import CHAT_TEMPLATE

PINPOINTS = ((28, 56), (56, 28), (56, 56))


def build_llava_next(
    out: Path,
    tower: str = "clip",
    image_size: int = 28,
    patch: int = 7,
    pinpoints: Sequence[Sequence[int]] = PINPOINTS,
    n_kv_heads: int = 2,
    seed: int = 0,
    save_model: bool = True,
    config_overrides: Optional[dict] = None,
) -> Path:
    """Write a tiny random LLaVA-NeXT (model, word-level tokenizer, processor) to ``out``.

    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(specials=[])
    tower_kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    if tower == "clip":  # a CLS token, dropped by strategy "default"
        vision = CLIPVisionConfig(projection_dim=32, **tower_kwargs)
        strategy, extra_tokens = "default", 1
    elif tower == "siglip":  # no CLS token: strategy "full"
        vision = SiglipVisionConfig(**tower_kwargs)
        strategy, extra_tokens = "full", 0
    else:
        raise ValueError(f"tower must be 'clip' or 'siglip', got {tower!r}")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    grid = [list(p) for p in pinpoints]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_grid_pinpoints=grid, **(config_overrides or {}),
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        num_additional_image_tokens=extra_tokens, vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
    )
    if save_model:
        LlavaNextForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
