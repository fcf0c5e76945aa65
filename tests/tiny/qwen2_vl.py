"""Tiny Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a ViT over 14 px patches (here
``patch`` px) whose 2 x 2 neighbourhoods a merger turns into one token each, and a Qwen text
tower with 3-D M-RoPE positions.

The processor is the family's own class with its PIL image processor and a word-level
tokenizer carrying the family's special tokens (``<|vision_start|>``, ``<|image_pad|>``,
``<|vision_end|>``, ``<|video_pad|>``), saved without a video processor (torchvision is
not installable here) so it loads the way a hub checkpoint loads on such a machine. With
``patch=4`` and the pixel bounds below, a 61 x 43 photo becomes a 40 x 64 px image: a
(1, 10, 16) patch grid, merged into 5 x 8 = 40 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.tiny import word_tokenizer
from vlens.adapters._processors import images_only

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

VARIANTS = {
    # family: (config class, model class, processor class, image processor class)
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessorPil"),
    "qwen2_5_vl": (
        "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil",
    ),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil"),
}


def _tokenizer():
    return word_tokenizer(
        specials=SPECIALS, image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
    )


def build_qwen(
    out: Path,
    variant: str = "qwen2_vl",
    patch: int = 4,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
    seed: int = 0,
    save_model: bool = True,
) -> Path:
    """Write a tiny random Qwen-VL of ``variant`` (model, tokenizer, processor) to ``out``."""
    torch.manual_seed(seed)
    config_name, model_name, processor_name, image_processor_name = VARIANTS[variant]
    tokenizer = _tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ["<|image_pad|>", "<|video_pad|>", *SPECIALS]}
    head_dim = 8
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = dict(depth=2, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if variant == "qwen2_vl":
        vision.update(embed_dim=16, hidden_size=32, mlp_ratio=2)
    elif variant == "qwen2_5_vl":
        vision.update(
            hidden_size=16, out_hidden_size=32, intermediate_size=32, window_size=4 * patch * 2,
            fullatt_block_indexes=[1],
        )
    else:
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                   "mrope_interleaved": True}
        vision.update(
            hidden_size=16, out_hidden_size=32, intermediate_size=32, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
    config_cls = getattr(transformers, config_name)
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = [model_name]
    image_processor = getattr(transformers, image_processor_name)(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
    )
    processor = images_only(getattr(transformers, processor_name))(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    if save_model:
        model = getattr(transformers, model_name)(config).eval()
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, **kwargs) -> Path:
    return build_qwen(out, "qwen2_vl", **kwargs)


def build_qwen2_5_vl(out: Path, **kwargs) -> Path:
    # Seed 0's random weights generate <|image_pad|> from a prompt, which no real model does and
    # which the no-cache greedy reference cannot re-run (more placeholders than image features).
    kwargs.setdefault("seed", 2)
    return build_qwen(out, "qwen2_5_vl", **kwargs)


def build_qwen3_vl(out: Path, **kwargs) -> Path:
    return build_qwen(out, "qwen3_vl", **kwargs)
