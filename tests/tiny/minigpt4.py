"""A tiny MiniGPT-4 in its original, non-Hugging-Face form, as ``vlens convert minigpt4`` takes it.

Three parts, as the authors distribute them:
    * a BLIP-2 folder in Hugging Face format (MiniGPT-4 used the Flan-T5-XXL BLIP-2's ViT
      and Q-Former; so does this one, with a tiny T5 tower the converter ignores);
    * a Vicuna (Llama) folder in Hugging Face format;
    * the MiniGPT-4 ``.pth``: ``{"model": {"llama_proj.weight", "llama_proj.bias"}, ...}``,
      the only weights MiniGPT-4 trains (Vision-CAIR/MiniGPT-4, ``mini_gpt4.py``:
      ``self.llama_proj = nn.Linear(Qformer hidden, llama hidden)``, loaded with
      ``load_state_dict(ckpt['model'], strict=False)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
)

from tests.tiny.blip import IMAGE_SIZE, PATCH, _image_processor, blip_tokenizer, randomise

N_QUERY = 5
QFORMER_HIDDEN = 32
LLAMA_HIDDEN = 48


def build_minigpt4_parts(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three parts under ``root``; returns ``{"minigpt4", "blip2", "vicuna"}`` paths."""
    torch.manual_seed(seed)
    tokenizer = blip_tokenizer()
    blip2_dir, vicuna_dir, ckpt = root / "blip2-flan-t5", root / "vicuna", root / "prerained_minigpt4.pth"

    blip2 = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=QFORMER_HIDDEN, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          cross_attention_frequency=2).to_dict(),
        text_config=T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                             num_heads=4, decoder_start_token_id=0).to_dict(),
        num_query_tokens=N_QUERY,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    blip2_model = Blip2ForConditionalGeneration(blip2).eval()
    randomise(blip2_model)
    blip2_model.save_pretrained(blip2_dir)
    Blip2Processor(image_processor=_image_processor(), tokenizer=blip_tokenizer(), num_query_tokens=N_QUERY).save_pretrained(blip2_dir)

    vicuna = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).eval()
    with torch.no_grad():
        for param in vicuna.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 2.0 * param.shape[-1] ** -0.5)
    vicuna.save_pretrained(vicuna_dir)
    tokenizer.save_pretrained(vicuna_dir)

    write_minigpt4_ckpt(ckpt, torch.randn(LLAMA_HIDDEN, QFORMER_HIDDEN) * QFORMER_HIDDEN ** -0.5, torch.randn(LLAMA_HIDDEN) * 0.1)
    return {"minigpt4": ckpt, "blip2": blip2_dir, "vicuna": vicuna_dir}


def write_minigpt4_ckpt(path: Path, weight: torch.Tensor, bias: torch.Tensor, **extra_model_keys: torch.Tensor) -> Path:
    """A ``.pth`` in MiniGPT-4's training-checkpoint layout (``model``, ``optimizer``, ``epoch``...)."""
    model = {"llama_proj.weight": weight, "llama_proj.bias": bias, **extra_model_keys}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 4}, path)
    return path
