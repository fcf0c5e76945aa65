"""Normalising ``HookedVLM.prepare`` arguments into a processed, laid-out batch."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

from vlens.adapters.base import VisionPrefixAdapter
from vlens.errors import PromptError
from vlens.images import to_rgb
from vlens.inputs import VLMInputs

_CORE_KEYS = ("input_ids", "attention_mask", "pixel_values")


def _as_image_list(item: Any) -> list:
    if item is None:
        return []
    if isinstance(item, (list, tuple)):
        return [to_rgb(im) for im in item]
    return [to_rgb(item)]


def normalise(
    images: Any,
    prompts: Union[str, Sequence[str]],
    answer: Union[None, str, Sequence[Optional[str]]],
) -> tuple[list[list], list[str], list[Optional[str]]]:
    """Per-row image lists, prompts and answers, checked for type and length."""
    if isinstance(prompts, str):
        rows_images = [_as_image_list(images)]
        rows_prompts = [prompts]
        if answer is not None and not isinstance(answer, str):
            raise PromptError(f"a single prompt takes a single answer string, got {type(answer).__name__}")
        rows_answers: list[Optional[str]] = [answer]
    elif isinstance(prompts, (list, tuple)):
        if not prompts:
            raise PromptError("prompts is an empty list; pass at least one prompt")
        if not isinstance(images, (list, tuple)):
            raise PromptError(
                f"a batch of {len(prompts)} prompts needs a list of {len(prompts)} images (one per prompt), "
                f"got a single {type(images).__name__}"
            )
        if len(images) != len(prompts):
            raise PromptError(
                f"batch lists differ in length: {len(images)} images but {len(prompts)} prompts; pass one image "
                "(or one list of images) per prompt"
            )
        rows_images = [_as_image_list(item) for item in images]
        rows_prompts = list(prompts)
        if answer is None:
            rows_answers = [None] * len(prompts)
        elif isinstance(answer, str) or not isinstance(answer, (list, tuple)):
            raise PromptError(f"a batch of {len(prompts)} prompts takes a list of {len(prompts)} answers (or None)")
        elif len(answer) != len(prompts):
            raise PromptError(f"batch lists differ in length: {len(answer)} answers but {len(prompts)} prompts")
        else:
            rows_answers = list(answer)
    else:
        raise PromptError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    for i, prompt in enumerate(rows_prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {i} is a {type(prompt).__name__}, not a string: {prompt!r}")
    for i, ans in enumerate(rows_answers):
        if ans is not None and (not isinstance(ans, str) or not ans.strip()):
            raise PromptError(f"answer {i} is {ans!r}; an answer must be non-empty text (or None for no answer)")
    return rows_images, rows_prompts, rows_answers


def prepare_batch(
    adapter: VisionPrefixAdapter,
    images: Any,
    prompts: Union[str, Sequence[str]],
    answer: Union[None, str, Sequence[Optional[str]]],
    chat_template: bool,
) -> VLMInputs:
    """See ``HookedVLM.prepare``."""
    rows_images, rows_prompts, rows_answers = normalise(images, prompts, answer)
    prompt_texts = [
        adapter.format_prompt(p, len(imgs), chat_template) for p, imgs in zip(rows_prompts, rows_images)
    ]
    full_texts = [
        t if a is None else t + adapter.answer_separator(t) + a for t, a in zip(prompt_texts, rows_answers)
    ]
    batch = adapter.process_full(rows_images, full_texts, prompt_texts)
    lengths = batch["attention_mask"].sum(1).tolist()
    answer_start = list(lengths)
    if any(a is not None for a in rows_answers):
        prompt_batch = adapter.process(rows_images, prompt_texts)
        for row, ans in enumerate(rows_answers):
            if ans is None:
                continue
            answer_start[row] = _answer_start(batch, prompt_batch, row, ans)
    _warn_unknown_words(adapter.tokenizer, batch, rows_prompts, rows_answers)
    layout = adapter.with_token_boxes(adapter.build_layout(batch, answer_start), rows_images)
    extras = adapter.model_extras(batch)
    return VLMInputs(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        extras=extras,
        layout=layout,
        images=tuple(tuple(imgs) for imgs in rows_images),
        prompts=tuple(rows_prompts),
        answers=tuple(rows_answers),
        texts=tuple(prompt_texts),
    )


class UnknownWordsWarning(UserWarning):
    """Prompt or answer words that the tokenizer can only read as its unknown token."""


def _warn_unknown_words(
    tokenizer: Any, batch: Any, prompts: Sequence[str], answers: Sequence[Optional[str]]
) -> None:
    """Warn, naming the words, when the tokenizer turned some of them into its unknown token.

    A word-level tokenizer (the toy's) reads ``what animal is this ?`` as ``what <unk> is <unk> ?``
    and the analyses would then measure the model on a question nobody asked.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not bool((batch["input_ids"][batch["attention_mask"].bool()] == unk).any()):
        return
    words: list[str] = []
    for text in [*prompts, *(a for a in answers if a is not None)]:
        for word in text.split():
            if word not in words and unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
                words.append(word)
    if words:
        warnings.warn(
            f"the tokenizer does not know the word(s) {words} and reads each as {tokenizer.unk_token!r}; "
            "use words from its vocabulary (model.tokenizer.get_vocab(), also in the checkpoint's "
            "tokenizer.json)",
            UnknownWordsWarning,
            stacklevel=4,
        )


def _answer_start(full_batch: Any, prompt_batch: Any, row: int, answer: str) -> int:
    """First position whose token carries answer text.

    The prompt alone and the prompt plus answer tokenize identically up to the answer
    (a tokenizer may merge across the boundary, in which case the merged token is the
    first that differs and counts as the answer's first).
    """
    full = full_batch["input_ids"][row][full_batch["attention_mask"][row].bool()]
    prompt = prompt_batch["input_ids"][row][prompt_batch["attention_mask"][row].bool()]
    n = min(len(full), len(prompt))
    differs = (full[:n] != prompt[:n]).nonzero()
    start = int(differs[0]) if len(differs) else n
    if start >= len(full):
        raise PromptError(f"answer {answer!r} adds no token after the prompt; pass a non-empty answer")
    return start
