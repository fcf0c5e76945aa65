"""The report's caveats: a flat-at-zero match rate and contribution maps within numerical noise
or tiny get a note; the lens labels come from the scene's per-patch ground truth."""

from __future__ import annotations

import math

import numpy as np
import torch

from vlens.viz._report_notes import NOISE_NATS, TINY_NATS, contribution_notes, match_rate_notes


def test_contribution_notes_by_size_of_the_largest_effect():
    assert "numerical noise" in contribution_notes(torch.tensor([3e-5, -8e-5, float("nan")]), 0.002)[0]
    tiny = contribution_notes(torch.tensor([1e-3, -2e-3]), 0.002)[0]
    assert "Tiny effects" in tiny and "2.0e-03 nats" in tiny and f"{(math.exp(2e-3) - 1) * 100:.2f}%" in tiny
    assert contribution_notes(torch.tensor([0.05, -0.2]), 0.5) == []
    assert "Tiny next to the loss" in contribution_notes(torch.tensor([0.02, -0.03]), 4.0)[0]
    assert contribution_notes(torch.tensor([float("nan")]), 0.5) == ["No finite contribution: nothing to show."]
    assert NOISE_NATS < TINY_NATS


def test_match_rate_note_only_when_every_curve_is_zero():
    zero = {"object's colour word": torch.zeros(9), "control: labels shuffled": torch.full((9,), 0.1)}
    note = match_rate_notes(zero, ["at"] * 9 + ["<pad>"] * 2, 5)
    assert len(note) == 1 and "0 at every layer" in note[0] and "'at' (9)" in note[0]
    some = {"object's colour word": torch.tensor([0.0, 0.0, 0.2]), "control: labels shuffled": torch.zeros(3)}
    assert match_rate_notes(some, ["red"], 5) == []


def test_token_words_follow_the_scene_ground_truth():
    from vlens.data import generate_scene
    from vlens.data.ground_truth import token_words
    from vlens.layout import grid_span

    scene = generate_scene(0)
    span = grid_span(0, torch.arange(3, 67), 8, 8)
    words = token_words(scene, span, "colour")
    owners = scene.patch_labels.reshape(-1)
    expected = [scene.objects[o].colour if o >= 0 else None for o in owners]
    assert words == expected
    assert sum(w is not None for w in words) == int((owners >= 0).sum()) > 0
    assert token_words(scene, grid_span(0, torch.arange(16), 4, 4), "shape") is None
    np.testing.assert_array_equal(np.array([w is None for w in token_words(scene, span, "shape")]), owners < 0)
