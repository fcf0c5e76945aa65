"""Smoke test of the toy-model recipe, and the contracts its fast paths rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlens.data import generate_scene
from vlens.zoo.config import build_model, recipe_config
from vlens.zoo.examples import Encoder, build_pool, describe, training_questions
from vlens.zoo.processor import build_processor, prompt_text
from vlens.zoo.stages import multimodal_logits, packed_image_example, packed_text_example, vision_states
from vlens.zoo.train import run_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy")
    report = run_recipe(out, seed=0, scale="tiny", threads=1, progress=False)
    return out, report


def test_every_stage_runs_and_checkpoint_loads(tiny_run: tuple[Path, dict]) -> None:
    out, report = tiny_run
    assert set(report["stages"]) == {"vision", "text", "align", "instruct"}
    assert json.loads((out / "training_report.json").read_text())["seed"] == 0
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    scene = generate_scene(1)
    inputs = processor(images=scene.image, text=prompt_text(processor, "how many objects are there ?"),
                       return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 64
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def test_recipe_is_deterministic(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_run
    run_recipe(tmp_path, seed=0, scale="tiny", threads=1, progress=False)
    a = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_contract_and_single_bos() -> None:
    processor = build_processor(64, 8)
    text = prompt_text(processor, "what shape is at center ?")
    assert text == "<s> USER : <image> what shape is at center ? ASSISTANT :"
    ids = processor(images=generate_scene(0).image, text=text)["input_ids"][0]
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and list(ids).count(bos) == 1
    assert processor.tokenizer.unk_token_id not in ids


def test_fast_encoding_equals_processor() -> None:
    processor = build_processor(64, 8)
    encoder = Encoder(processor, n_image_tokens=64)
    scenes = [generate_scene(s) for s in range(4)]
    pool = build_pool(scenes)
    for i, scene in enumerate(scenes):
        for qa in scene.questions:
            ids, mask = encoder.encode(qa.question, qa.answer, with_image=True)
            full = prompt_text(processor, qa.question) + " " + qa.answer + " </s>"
            ref = processor(images=scene.image, text=full, return_tensors="pt")
            assert ids == ref["input_ids"][0].tolist()
            supervised = [t for t, m in zip(ids, mask) if m]
            assert processor.tokenizer.decode(supervised) == qa.answer + " </s>"
            assert torch.allclose(pool.pixels[i], ref["pixel_values"][0], atol=1e-6)


def test_spliced_forward_equals_hf_forward() -> None:
    torch.manual_seed(0)
    cfg = recipe_config("tiny")
    processor = build_processor(64, 8)
    model = build_model(cfg.arch, processor).eval()
    encoder = Encoder(processor, n_image_tokens=64)
    scene = generate_scene(5)
    qa = scene.questions[0]
    batch = encoder.collate([encoder.encode(qa.question, qa.answer, with_image=True)])
    states = vision_states(model, build_pool([scene]).pixels)
    with torch.no_grad():
        ours = multimodal_logits(model, batch, states, encoder.image_token_id)
        full = prompt_text(processor, qa.question) + " " + qa.answer + " </s>"
        ref = model(**processor(images=scene.image, text=full, return_tensors="pt")).logits
    assert torch.allclose(ours, ref, atol=1e-5)


def _branch_logits_equal_separate_forwards(encoder, packed, encodings_per_row, forward) -> None:
    """Each branch of each packed row gives the logits of its dialogue run on its own."""
    logits = forward(encoder.collate_packed(packed), rows=slice(None))
    for row, encodings in enumerate(encodings_per_row):
        p = packed[row]
        for k, encoding in enumerate(encodings, start=1):
            alone = forward(encoder.collate([encoding]), rows=slice(row, row + 1))[0]
            # The tokens branch k sees, in order: the shared ones, then its own.
            seen = [j for j, b in enumerate(p.branch) if b in (0, k)]
            assert [p.ids[j] for j in seen] == encoding[0]
            assert torch.allclose(logits[row, seen], alone, atol=1e-5)


def test_packed_image_questions_compute_what_separate_ones_do() -> None:
    torch.manual_seed(0)
    processor = build_processor(64, 8)
    model = build_model(recipe_config("tiny").arch, processor).eval()
    encoder = Encoder(processor, n_image_tokens=64)
    pool = build_pool([generate_scene(s) for s in (3, 4)])
    states = vision_states(model, pool.pixels)
    packed = [packed_image_example(encoder, pool, i) for i in range(len(pool))]
    encodings = [[encoder.encode(qa.question, qa.answer, with_image=True) for qa in training_questions(s)]
                 for s in pool.scenes]
    # Shared: bos, "USER", ":" and the 64 image placeholders, and no more (questions differ).
    assert all(p.branch.count(0) == 67 for p in packed)

    def forward(batch, rows):
        with torch.no_grad():
            return multimodal_logits(model, batch, states[rows], encoder.image_token_id)

    _branch_logits_equal_separate_forwards(encoder, packed, encodings, forward)
    # Supervised tokens are exactly the answers of every branch.
    labels = encoder.collate_packed(packed).labels[0]
    answers = " ".join(qa.answer + " </s>" for qa in training_questions(pool.scenes[0]))
    assert processor.tokenizer.decode(labels[labels != -100]) == answers


def test_packed_text_dialogues_compute_what_separate_ones_do() -> None:
    torch.manual_seed(1)
    processor = build_processor(64, 8)
    model = build_model(recipe_config("tiny").arch, processor).eval()
    encoder = Encoder(processor, n_image_tokens=64)
    pool = build_pool([generate_scene(s) for s in (7, 8)])
    packed = [packed_text_example(encoder, pool, i, np.random.default_rng(i)) for i in range(len(pool))]
    encodings = []
    for i, scene in enumerate(pool.scenes):
        context = describe(scene, np.random.default_rng(i))  # the description the example drew
        encodings.append([encoder.encode(context + " " + qa.question, qa.answer, with_image=False)
                          for qa in training_questions(scene)])

    def forward(batch, rows):
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits

    _branch_logits_equal_separate_forwards(encoder, packed, encodings, forward)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="huge"):
        recipe_config("huge")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        run_recipe(tmp_path, seed=-1, scale="tiny", progress=False)
    encoder = Encoder(build_processor(64, 8), n_image_tokens=64)
    with pytest.raises(ValueError, match="hexagon"):
        encoder.encode("what shape is at center ?", "hexagon", with_image=True)
    same = encoder.encode("what shape is at center ?", "circle", with_image=True)
    with pytest.raises(ValueError, match="same prompt"):
        encoder.pack([same, encoder.encode("what shape is at center ?", "square", with_image=True)])
    with pytest.raises(ValueError, match="at least one"):
        encoder.pack([])
    with pytest.raises(ValueError, match="at least one packed"):
        encoder.collate_packed([])
