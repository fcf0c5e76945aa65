"""Tiny Idefics3 / SmolVLM checkpoints: SigLIP-style tower, pixel shuffle, Llama tower.

With ``image_size=56``, ``patch=7`` and ``scale_factor=2`` every crop (and the global
image) becomes an 8 x 8 patch grid, shuffled into 4 x 4 = 16 image tokens. The processor
first resizes an image's longest edge to ``longest_edge`` (two crops by default), then
splits it into square crops: a 61 x 43 photograph gives 2 x 2 crops, a 90 x 30 strip 1 x 2.
SmolVLM-style settings (``image_size=60, scale_factor=4``: a crop that is no whole number
of patches, folded 4 x 4) give 2 x 2 = 4 tokens per crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

from tests.tiny import word_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}<end_of_utterance> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)

MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


def build_idefics3(
    out: Path,
    image_size: int = 56,
    patch: int = 7,
    scale_factor: int = 2,
    longest_edge: Optional[int] = None,
    max_grid: int = 4,
    do_image_splitting: bool = True,
    seed: int = 0,
    save_model: bool = True,
) -> Path:
    """Write a tiny random Idefics3 (model, word-level tokenizer, processor) to ``out``.

    ``longest_edge`` (default ``2 * image_size``) is the size the processor resizes an
    image's longest edge to before cutting crops. ``save_model=False`` writes only the
    config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    longest_edge = 2 * image_size if longest_edge is None else longest_edge
    row_col = [f"<row_{i}_col_{j}>" for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    tokenizer = word_tokenizer(specials=[*MARKERS, *row_col])
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale_factor, pad_token_id=0,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size},
        do_image_splitting=do_image_splitting,
    )
    seq_len = ((image_size // patch) // scale_factor) ** 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE,
    )
    if save_model:
        Idefics3ForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
