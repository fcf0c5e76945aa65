"""Tiny BLIP-2 (OPT tower) and InstructBLIP (Llama tower) checkpoints.

The BLIP processors insert the query placeholders themselves (``num_query_tokens``
copies of ``<image>`` in front of the text); they fail when the tokenizer declares an
``image_token`` attribute, so these tokenizers hold ``<image>`` in their vocabulary as
an ordinary added special token and nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BlipImageProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from tests.tiny import WORDS

# BLIP-2's prompt template ("Question: ... Answer:") and MiniGPT-4's ("###Human: <Img>...").
PROMPT_WORDS = ("Question:", "Answer:", "###", "Human:", "Assistant:", "<Img>", "</Img>")

IMAGE_SIZE = 28
PATCH = 7
N_QUERY = 6


def blip_tokenizer(extra_words: Iterable[str] = (), bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``<image>`` as an added special token (no ``image_token``
    attribute, which the BLIP processors cannot handle); prepends ``<s>`` when ``bos``."""
    vocab: dict[str, int] = {}
    for tok in ["<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS, *PROMPT_WORDS, *extra_words]:
        vocab.setdefault(tok, len(vocab))
    for word in list(vocab):
        if word.isalpha() and word.lower() != word:
            vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Split on spaces and around "###" (MiniGPT-4 writes "...?###Assistant:").
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("###", behavior="isolated")]
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _vision(config_cls: type) -> object:
    return config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, qkv_bias=True,
    )


def _qformer(config_cls: type, vocab_size: int, n_layers: int = 2, cross_every: int = 1) -> object:
    return config_cls(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
        intermediate_size=64, cross_attention_frequency=cross_every, encoder_hidden_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=128,
    )


def _image_processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_blip2(
    out: Path, seed: int = 0, declare_image_token: bool = False, qformer_layers: int = 2, cross_every: int = 1
) -> Path:
    """Write a tiny random BLIP-2 with an OPT tower to ``out``; its Q-Former has
    ``qformer_layers`` layers, cross-attention on every ``cross_every``-th (released
    BLIP-2 checkpoints: 12 layers, every 2nd).

    ``declare_image_token`` gives the tokenizer an ``image_token`` attribute, with which
    HF's BLIP processors fail unless vlens repairs them.
    """
    torch.manual_seed(seed)
    tokenizer = blip_tokenizer()
    if declare_image_token:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        )
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        dropout=0.0, attention_dropout=0.0,
    )
    config = Blip2Config(
        vision_config=_vision(Blip2VisionConfig).to_dict(),
        qformer_config=_qformer(Blip2QFormerConfig, len(tokenizer), qformer_layers, cross_every).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=N_QUERY,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    randomise(model)
    processor = Blip2Processor(image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=N_QUERY)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_instructblip(out: Path, n_kv_heads: int = 2, seed: int = 0) -> Path:
    """Write a tiny random InstructBLIP with a Llama tower to ``out``."""
    torch.manual_seed(seed)
    tokenizer = blip_tokenizer()
    qformer_tokenizer = blip_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = InstructBlipConfig(
        vision_config=_vision(InstructBlipVisionConfig).to_dict(),
        qformer_config=_qformer(InstructBlipQFormerConfig, len(qformer_tokenizer)).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=N_QUERY,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    randomise(model)
    processor = InstructBlipProcessor(
        image_processor=_image_processor(), tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=N_QUERY,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def randomise(model: torch.nn.Module, gain: float = 2.0) -> None:
    """Re-draw every weight at a scale a trained model has.

    HF initialises BLIP's vision tower with std 1e-10, the rest with 0.02 and the query
    tokens with zeros: every attention pattern would be uniform and every query alike,
    so parity and layout tests would compare near-constant tensors.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name or name.endswith("norm.weight"):
                continue
            if param.dim() >= 2:
                param.normal_(0.0, gain * param[0].numel() ** -0.5)
            else:
                param.normal_(0.0, 0.1)
        model.query_tokens.normal_(0.0, 1.0)
