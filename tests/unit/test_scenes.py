"""The synthetic scene generator: determinism, ground truth against pixels, texts, splits."""

from __future__ import annotations

import numpy as np
import pytest

from vlens.data import (
    CELLS,
    COLOURS,
    SHAPES,
    SIZES,
    VOCABULARY,
    SceneObject,
    caption_split,
    every_question,
    generate_scene,
    make_scenes,
)
from vlens.data.scenes import PATCH_COVER_THRESHOLD


def _saturated(image) -> np.ndarray:
    """Object pixels: the background is grey (channels within ~16 of each other), objects are
    saturated colours (channel spread > 100 before noise)."""
    px = np.asarray(image, dtype=np.int64)
    return (px.max(axis=-1) - px.min(axis=-1)) > 60


def test_same_seed_same_scene() -> None:
    a, b = generate_scene(123), generate_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.patch_labels, b.patch_labels)
    assert (a.objects, a.caption, a.questions) == (b.objects, b.caption, b.questions)


def test_different_seeds_differ() -> None:
    images = {np.asarray(generate_scene(s).image).tobytes() for s in range(20)}
    assert len(images) == 20


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_patch_ground_truth_matches_pixels_for_single_objects(shape: str, size: str) -> None:
    # Find seeded single-object scenes with this shape and size; check every patch's label
    # against the share of saturated (object) pixels the image actually has in that patch.
    checked = 0
    for seed in range(2000):
        scene = generate_scene(seed, n_objects=1)
        obj = scene.objects[0]
        if (obj.shape, obj.size) != (shape, size):
            continue
        mask = _saturated(scene.image)
        cover = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        expected = np.where(cover >= PATCH_COVER_THRESHOLD, 0, -1)
        assert np.array_equal(scene.patch_labels, expected), (seed, shape, size)
        assert (scene.patch_labels == 0).any(), f"object owns no patch (seed {seed})"
        # The object lies in its named cell: its pixel centroid is inside that third of the image.
        ys, xs = np.nonzero(mask)
        row, col = int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))
        assert row * 3 + col == obj.cell
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_multi_object_labels_index_objects() -> None:
    for seed in range(50):
        scene = generate_scene(seed)
        owners = set(np.unique(scene.patch_labels).tolist()) - {-1}
        assert owners <= set(range(len(scene.objects)))
        assert [o.cell for o in scene.objects] == sorted(o.cell for o in scene.objects)


def test_texts_are_word_level_and_in_vocabulary() -> None:
    vocab = set(VOCABULARY)
    for seed in range(200):
        scene = generate_scene(seed)
        texts = [scene.caption] + [t for qa in scene.questions for t in (qa.question, qa.answer)]
        for text in texts:
            assert text == text.lower() and "  " not in text and text == text.strip()
            assert set(text.split()) <= vocab, text
    scene = generate_scene(3, n_objects=2)
    assert scene.caption == " and ".join(
        f"a {o.size} {o.colour} {o.shape} at {CELLS[o.cell]}" for o in scene.objects
    ) + " ."


def test_every_question_asks_about_each_object_with_the_right_answer() -> None:
    for seed in range(60):
        scene = generate_scene(seed)
        qas = every_question(scene)
        assert len({qa.question for qa in qas}) == len(qas)  # no prompt twice
        assert set(scene.questions) <= set(qas)  # the scene's own draw is among them
        lookups = [qa for qa in qas if qa.kind in ("colour", "shape", "where")]
        assert len(lookups) == 3 * len(scene.objects)
        # Answer each question independently from the object list.
        for qa in lookups:
            words = qa.question[:-2].split()
            if qa.kind == "where":
                (obj,) = [o for o in scene.objects if (o.colour, o.shape) == tuple(words[-2:])]
                assert qa.answer == CELLS[obj.cell]
            elif qa.kind == "shape":
                (obj,) = [o for o in scene.objects if CELLS[o.cell] == " ".join(words[4:])]
                assert qa.answer == obj.shape
            elif words[4] == "object":
                (obj,) = [o for o in scene.objects if CELLS[o.cell] == " ".join(words[6:])]
                assert qa.answer == obj.colour
            else:
                (obj,) = [o for o in scene.objects if o.shape == words[4]]
                assert qa.answer == obj.colour
        assert [qa.kind for qa in qas[len(lookups):]] == ["count", "present", "present"]


def test_question_kinds_and_balanced_presence() -> None:
    for seed in range(100):
        scene = generate_scene(seed)
        kinds = [qa.kind for qa in scene.questions]
        assert kinds == ["colour", "shape", "where", "count", "present", "present"]
        present = {(o.colour, o.shape) for o in scene.objects}
        yes, no = scene.questions[4], scene.questions[5]
        assert (yes.answer, no.answer) == ("yes", "no")
        assert tuple(no.question.split()[3:5]) not in present
        assert tuple(yes.question.split()[3:5]) in present


def test_heldout_captions_never_in_train() -> None:
    train = {s.caption for s in make_scenes(300, seed=1, split="train")}
    heldout = make_scenes(30, seed=2, split="heldout")
    assert all(caption_split(s.caption) == "heldout" for s in heldout)
    assert not train & {s.caption for s in heldout}


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        SceneObject(shape="hexagon", colour="red", size="big", cell=0)
    with pytest.raises(ValueError, match="teal"):
        SceneObject(shape="circle", colour="teal", size="big", cell=0)
    with pytest.raises(TypeError, match="seed"):
        generate_scene("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_objects"):
        generate_scene(0, n_objects=4)
    with pytest.raises(ValueError, match="split"):
        make_scenes(1, split="test")  # type: ignore[arg-type]
    assert len(COLOURS) == 6 and len(SHAPES) >= 5
