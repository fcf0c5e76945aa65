"""Tiny SmolVLM / SmolVLM2 checkpoints: SmolVLM's SigLIP-style tower, pixel shuffle, Llama tower.

With ``image_size=64``, ``patch=8`` and ``scale_factor=2`` every crop (and the global image)
is an 8 x 8 patch grid shuffled into 4 x 4 = 16 image tokens; the processor resizes an
image's longest edge to ``longest_edge`` (two crops by default), so a 61 x 43 photograph
gives 2 x 2 crops and a 90 x 30 strip 1 x 2, plus the global image.

The processor is the real ``SmolVLMProcessor`` with its image processor, tokenizer and the
released chat template, saved without a video processor (transformers builds those only
with torchvision) and built without ``num2words`` (its ``__init__`` asks for it, for video
prompts), as ``vlens.adapters._processors`` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

from tests.tiny import word_tokenizer
from vlens.adapters._processors import images_only, video_only_imports_absent

MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", "<video>"]


def build_smolvlm(
    out: Path,
    image_size: int = 64,
    patch: int = 8,
    scale_factor: int = 2,
    longest_edge: Optional[int] = None,
    max_grid: int = 4,
    seed: int = 0,
    save_model: bool = True,
) -> Path:
    """Write a tiny random SmolVLM (model, word-level tokenizer, processor) to ``out``.

    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    longest_edge = 2 * image_size if longest_edge is None else longest_edge
    row_col = [f"<row_{i}_col_{j}>" for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    tokenizer = word_tokenizer(specials=[*MARKERS, *row_col], extra_words=["User:", "Assistant:"])
    vision = SmolVLMVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = SmolVLMConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale_factor,
    )
    config.architectures = ["SmolVLMForConditionalGeneration"]
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size}, do_image_splitting=True,
    )
    seq_len = ((image_size // patch) // scale_factor) ** 2
    with video_only_imports_absent(SmolVLMProcessor):
        processor = images_only(SmolVLMProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
    if save_model:
        SmolVLMForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
