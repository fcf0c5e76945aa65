"""The shipped toy VLM answers held-out questions at the accuracy its model card states.

A fixed set of held-out scenes (none of whose captions occur in training) from a stream the
recipe's own evaluation does not use; greedy answers through `HookedVLM.generate`, which
reproduces Hugging Face's greedy ``generate`` token for token. Stated accuracy (docs/toy_model.md):
>= 90% exact answers per question type, >= 80% exact captions.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlens import HookedVLM
from vlens.data import make_scenes
from vlens.zoo import toy_checkpoint_path
from vlens.zoo.examples import questions_for_eval

N_SCENES = 12  # 12 scenes x (6 questions + 1 caption): 12 per type, 24 yes/no, 12 captions
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


def test_heldout_questions_answered_at_stated_accuracy(model: HookedVLM) -> None:
    scenes = make_scenes(N_SCENES, seed=STREAM_SEED, split="heldout")
    right: dict[str, list[bool]] = defaultdict(list)
    misses = []
    for scene in scenes:
        qas = questions_for_eval(scene)
        inputs = model.prepare([scene.image] * len(qas), [qa.question for qa in qas])
        out = model.generate(inputs, max_new_tokens=32)
        for qa, got in zip(qas, out.text):
            right[qa.kind].append(got == qa.answer)
            if got != qa.answer:
                misses.append((qa.question, qa.answer, got))
    accuracy = {k: sum(v) / len(v) for k, v in right.items()}
    for kind, acc in accuracy.items():
        target = CAPTION_TARGET if kind == "caption" else QUESTION_TARGET
        assert acc >= target, (kind, accuracy, misses)
