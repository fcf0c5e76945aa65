"""Tiny Gemma3 checkpoints: SigLIP tower, average-pooled soft tokens, Gemma3 text tower.

With ``image_size=56``, ``patch=7`` and ``mm_tokens_per_image=16`` the tower sees an 8 x 8
patch grid that the projector average-pools (kernel 2) into 4 x 4 = 16 soft tokens,
wrapped as ``<start_of_image> <image_soft_token>*16 <end_of_image>``. The text tower mixes
sliding-window and global layers with a window shorter than the prompts, and attends
bidirectionally inside an image (``token_type_ids``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from tests.tiny import word_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_gemma3(
    out: Path,
    image_size: int = 56,
    patch: int = 7,
    mm_tokens_per_image: int = 16,
    sliding_window: int = 24,
    final_logit_softcapping: float | None = None,
    attn_logit_softcapping: float | None = None,
    seed: int = 0,
    save_model: bool = True,
) -> Path:
    """Write a tiny random Gemma3 (model, word-level tokenizer, processor) to ``out``.

    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        specials=["<start_of_image>", "<end_of_image>"],
        image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch,
    )
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        final_logit_softcapping=final_logit_softcapping, attn_logit_softcapping=attn_logit_softcapping,
    )
    config = Gemma3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=mm_tokens_per_image,
        chat_template=CHAT_TEMPLATE,
    )
    if save_model:
        model = Gemma3ForConditionalGeneration(config).eval()
        # HF initialises the projection to zeros, which would make every image token
        # identical; random weights give the image tokens distinct, informative states.
        with torch.no_grad():
            projection = model.model.multi_modal_projector.mm_input_projection_weight
            projection.normal_(0.0, projection.shape[0] ** -0.5)
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
