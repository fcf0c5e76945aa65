"""Tiny random checkpoints built from Hugging Face configs, one module per family.

Each builder writes a model, tokenizer and processor with ``save_pretrained`` into a
folder, so tests load them through ``HookedVLM.from_pretrained(path)``: the same path a
hub checkpoint takes. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Words the test prompts and answers use, so nothing maps to <unk>.
WORDS = (
    "USER ASSISTANT user assistant : what is in the image ? a an cat dog red blue green big small circle square "
    "describe . , there left right top bottom center of on and no yes how many one two three the color shape"
).split()


def word_tokenizer(specials: Iterable[str], extra_words: Iterable[str] = (), image_token: str = "<image>", **named) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then
    ``specials`` (image tokens and markers), then words (case-folded)."""
    vocab: dict[str, int] = {}
    for tok in ["<pad>", "<s>", "</s>", "<unk>", image_token, *specials, *WORDS, *extra_words]:
        vocab.setdefault(tok, len(vocab))
    for word in list(vocab):
        if word.isalpha() and word.lower() != word:
            vocab.setdefault(word.lower(), len(vocab))
    model = models.WordLevel(vocab, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"image_token": image_token, **named}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra,
    )
    fast.add_special_tokens({"additional_special_tokens": [image_token, *specials]})
    return fast
