"""The shipped toy VLM answers held-out questions at the accuracy its model card states.

A fixed set of held-out scenes (none of whose captions occur in training) from a stream the
recipe's own evaluation does not use; greedy answers through `HookedVLM.generate`, which
reproduces Hugging Face's greedy ``generate`` token for token. Issue 5's targets: >= 90% exact
answers per question type, >= 80% exact captions (docs/toy_model.md gives the checkpoint's
accuracy on 300-scene streams).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlens import HookedVLM
from vlens.data import make_scenes
from vlens.zoo import toy_checkpoint_path
from vlens.zoo.examples import questions_for_eval

N_SCENES = 10  # 10 scenes x (6 questions + 1 caption): 10 per type, 20 yes/no, 10 captions
STREAM_SEED = 20_000
QUESTION_TARGET = 0.9
CAPTION_TARGET = 0.8


@pytest.fixture(scope="module")
def model() -> HookedVLM:
    return HookedVLM.from_pretrained("toy")


def test_checkpoint_loads_like_a_hub_checkpoint() -> None:
    path = toy_checkpoint_path()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= 15 * 1024 * 1024
    hf = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert hf.config.text_config.num_hidden_layers >= 8
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_id


@pytest.fixture(scope="module")
def answers(model: HookedVLM) -> dict[str, list[tuple[str, str, str]]]:
    """Per kind: (question, expected, greedy answer) over the fixed held-out set."""
    scenes = make_scenes(N_SCENES, seed=STREAM_SEED, split="heldout")
    out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    # One thread: the model is tiny, and on a busy 2-core machine a second thread makes each
    # decoding step several times slower (thread synchronisation, not arithmetic, dominates).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for scene in scenes:
            for qa in questions_for_eval(scene):
                # Answers are at most two words and the eos; captions at most 26 tokens.
                budget = 27 if qa.kind == "caption" else 3
                got = model.generate(model.prepare(scene.image, qa.question), max_new_tokens=budget)
                out[qa.kind].append((qa.question, qa.answer, got.text[0]))
    finally:
        torch.set_num_threads(threads)
    return out


def _accuracy(rows: list[tuple[str, str, str]]) -> float:
    return sum(expected == got for _, expected, got in rows) / len(rows)


def test_heldout_questions_meet_issue_targets(answers: dict) -> None:
    accuracy = {kind: _accuracy(rows) for kind, rows in answers.items()}
    for kind, acc in accuracy.items():
        target = CAPTION_TARGET if kind == "caption" else QUESTION_TARGET
        assert acc >= target, (kind, accuracy)


def test_heldout_answers_beat_most_common_answer(answers: dict) -> None:
    # What the model card states for the shipped checkpoint: every open question type is
    # answered above the always-the-most-common-answer baseline.
    train_answers = defaultdict(list)
    for scene in make_scenes(300, seed=0, split="train"):
        for qa in questions_for_eval(scene):
            train_answers[qa.kind].append(qa.answer)
    for kind in ("colour", "shape", "where", "count", "present", "caption"):
        common = max(set(train_answers[kind]), key=train_answers[kind].count)
        baseline = sum(expected == common for _, expected, _ in answers[kind]) / len(answers[kind])
        assert _accuracy(answers[kind]) > baseline, (kind, answers[kind])


def test_default_scene_caption_equals_a_no_cache_greedy_loop(model: HookedVLM) -> None:
    # The caption `vlens report` shows: the reference is the untouched Hugging Face model re-run on
    # the whole sequence at every step, which no key/value-cache bug can reach (transformers 5.24
    # under TransformerLens 4.3 once turned this caption into "a yes yes yes ...").
    from tests.parity.helpers import greedy_without_cache
    from vlens.data import CAPTION_QUESTION, generate_scene

    inputs = model.prepare(generate_scene(0).image, CAPTION_QUESTION)
    reference = LlavaForConditionalGeneration.from_pretrained(toy_checkpoint_path(), attn_implementation="eager").eval()
    got = model.generate(inputs, max_new_tokens=12).tokens[0]
    expected = greedy_without_cache(reference, inputs.model_kwargs(), 12)
    assert torch.equal(got, expected[: len(got)]) and len(got) >= 8, (got.tolist(), expected.tolist())
    assert model.tokenizer.decode(got, skip_special_tokens=True).startswith("a ")
