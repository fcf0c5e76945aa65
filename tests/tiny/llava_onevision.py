"""Tiny LLaVA-OneVision checkpoints: SigLIP tower, anyres_max tiles, ``image_newline``, Qwen2 tower.

With ``image_size=28`` and ``patch=7`` every tile is a 4 x 4 grid of patches. The
``image_grid_pinpoints`` offer 1 x 2, 2 x 1 and 2 x 2 tile canvases (28 x 56, 56 x 28,
56 x 56 px), so a 61 x 43 photograph lands on the 2 x 2 canvas (8 x 8 patches) and
unpadding drops whole patch rows from it. ``vision_aspect_ratio="anyres_max_9"`` (the
released checkpoints' setting) never downsamples a canvas this small; ``"anyres_max_1"``
makes the model resample the unpadded canvas bilinearly down to about one tile.

The processor is built for images only (``images_only``): transformers builds its video
processor only with torchvision; saved, it names ``LlavaOnevisionProcessor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from tests.tiny import word_tokenizer
from tests.tiny.llava import CHAT_TEMPLATE
from vlens.adapters._processors import images_only

PINPOINTS = ((28, 56), (56, 28), (56, 56))


def build_llava_onevision(
    out: Path,
    aspect_ratio: str = "anyres_max_9",
    image_size: int = 28,
    patch: int = 7,
    pinpoints: Sequence[Sequence[int]] = PINPOINTS,
    n_kv_heads: int = 2,
    seed: int = 0,
    save_model: bool = True,
    config_overrides: Optional[dict] = None,
) -> Path:
    """Write a tiny random LLaVA-OneVision (model, word-level tokenizer, processor) to ``out``.

    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(specials=["<video>"], video_token="<video>")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    grid = [list(p) for p in pinpoints]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=aspect_ratio, projector_hidden_act="gelu",
        image_grid_pinpoints=grid, tie_word_embeddings=False, **(config_overrides or {}),
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=grid,
    )
    processor = images_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=aspect_ratio, chat_template=CHAT_TEMPLATE,
    )
    if save_model:
        LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
