"""Tiny LLaVA-1.5 checkpoints: CLIP or SigLIP tower, MLP projector, Llama tower."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionConfig,
)

from tests.tiny import word_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }} : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_llava(out: Path, tower: str = "clip", n_kv_heads: int = 2, image_size: int = 28, patch: int = 7, seed: int = 0) -> Path:
    """Write a tiny random LLaVA to ``out``: ``(image_size/patch)^2`` image tokens."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(specials=[])
    if tower == "clip":
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch, projection_dim=32,
        )
        strategy, extra_tokens = "default", 1
    elif tower == "siglip":
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch,
        )
        strategy, extra_tokens = "full", 0
    else:
        raise ValueError(f"tower must be 'clip' or 'siglip', got {tower!r}")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        num_additional_image_tokens=extra_tokens, vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
