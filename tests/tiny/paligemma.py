"""Tiny PaliGemma / PaliGemma 2 checkpoints: SigLIP tower, linear projector, Gemma (or Gemma 2) tower.

With ``image_size=28`` and ``patch=7`` the tower sees a 4 x 4 patch grid: 16 image tokens per
image, in raster order, with no markers (few, because PaliGemma's token-removal analyses run
one full forward per variant). The real ``PaliGemmaProcessor`` writes
``<image>*16 <bos> prompt \\n`` (its own format) and, given a suffix, ``answer <eos>`` after it
with ``token_type_ids`` 1, and adds its 1,152 ``<locNNNN>`` / ``<segNNN>`` tokens to the
vocabulary: the text tower's vocabulary is sized to the tokenizer after that, as the real
checkpoints' 257,152 + ... are.

The tokenizer is a whitespace word-level one with Gemma's special tokens (``<pad>`` 0,
``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) and ``\\n`` as a token of its own, as Gemma's
SentencePiece vocabulary has it (PaliGemma's prompts end with it).

``gemma2=True`` builds a PaliGemma 2: a Gemma 2 tower with sliding-window and global layers
(a window shorter than the prompts), attention and final-logit soft-capping.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from tests.tiny import WORDS

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def gemma_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma's special tokens and ``\\n``; ``<image>`` is left for
    the PaliGemma processor to add, as it does for a tokenizer without one."""
    vocab: dict[str, int] = {}
    for tok in [*SPECIALS, *WORDS]:
        vocab.setdefault(tok, len(vocab))
    for word in list(vocab):
        if word.isalpha() and word.lower() != word:
            vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
    )


def build_paligemma(
    out: Path,
    image_size: int = 28,
    patch: int = 7,
    gemma2: bool = False,
    sliding_window: int = 24,
    softcap: float = 1.0,
    seed: int = 0,
    save_model: bool = True,
) -> Path:
    """Write a tiny random PaliGemma (or PaliGemma 2) with the real processor to ``out``.

    ``softcap`` is PaliGemma 2's attention and final-logit soft cap ``cap * tanh(x / cap)``:
    the released 50 and 30 would leave a tiny model's scores and logits (about 1) on the
    linear part of the tanh, where forgetting the cap goes unnoticed; 1.0 bends them.
    ``save_model=False`` writes only the config and processor (enough for layout tests).
    """
    torch.manual_seed(seed)
    tokenizer = gemma_word_tokenizer()
    n_tokens = (image_size // patch) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = n_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image>, loc, seg
    vocab_size = len(processor.tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch, vision_use_head=False,
    )
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )
    if gemma2:
        text = Gemma2Config(
            **common, query_pre_attn_scalar=8, sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=softcap, final_logit_softcapping=softcap,
        )
    else:
        text = GemmaConfig(**common)
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32, hidden_size=32,
        image_token_index=processor.image_token_id, vocab_size=vocab_size,
    )
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    if save_model:
        PaliGemmaForConditionalGeneration(config).eval().save_pretrained(out)
    else:
        config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
