"""docs/toy_model.md's vocabulary list is the toy tokenizer's, and its example prompts work:
every listed word is in the vocabulary (and every vocabulary entry is listed), and the toy's
greedy answer to each listed prompt on the card's scene is that scene's ground truth."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CARD = Path(__file__).resolve().parents[2] / "docs" / "toy_model.md"


def _block(name: str) -> str:
    found = re.search(rf"<!-- {name}:.*?-->(.*?)<!-- /{name} -->", CARD.read_text(encoding="utf-8"), re.S)
    assert found, f"docs/toy_model.md has no {name} block"
    return found.group(1)


@pytest.fixture(scope="module")
def toy():
    from vlens import HookedVLM

    return HookedVLM.from_pretrained("toy", device="cpu")


def test_every_listed_word_is_in_the_vocabulary_and_every_entry_is_listed(toy):
    listed = re.findall(r"`([^`]+)`", _block("vocabulary"))
    vocab = toy.tokenizer.get_vocab()
    assert [w for w in listed if w not in vocab] == []
    assert sorted(listed) == sorted(vocab), "the card must list every entry of the vocabulary once"
    assert listed == sorted(vocab, key=vocab.get), "the card lists the words in id order"


def test_listed_prompts_use_known_words_and_get_the_ground_truth_answer(toy):
    from vlens.data import CAPTION_QUESTION, every_question, generate_scene

    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", _block("prompts"), re.M)
    assert len(rows) >= 8
    scene = generate_scene(0)
    truth = {qa.question: qa.answer for qa in every_question(scene)} | {CAPTION_QUESTION: scene.caption}
    vocab = toy.tokenizer.get_vocab()
    for prompt, answer in rows:
        assert all(word in vocab for word in prompt.split()), prompt
        assert truth[prompt] == answer, f"the card's answer to {prompt!r} is not the scene's ground truth"
        got = toy.generate(toy.prepare(scene.image, prompt), max_new_tokens=30).text[0]
        assert got == answer, (prompt, got)
