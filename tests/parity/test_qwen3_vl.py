"""Qwen3-VL parity: vlens equals Hugging Face's own Qwen3VLForConditionalGeneration (interleaved M-RoPE, DeepStack) (3-D M-RoPE,
dynamic resolution, ``mm_token_type_ids``) on a tiny random checkpoint; see ``qwen_checks``."""

from __future__ import annotations

import pytest

from tests.parity import qwen_checks as checks
from tests.parity.helpers import hooked_and_reference
from tests.tiny.qwen2_vl import build_qwen3_vl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hooked_and_reference(build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl")))


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    checks.check_equals_hf(*tiny, photo)


def test_forward_needs_mm_token_type_ids(tiny, photo):
    checks.check_forward_needs_token_types_and_vlens_passes_them(*tiny, photo)


def test_layout_grid_markers_labels_and_positions(tiny, photo, photo2):
    checks.check_layout(*tiny, photo, photo2)


def test_batched_equals_unbatched_with_different_grids(tiny, photo, photo2):
    checks.check_batched_equals_unbatched(tiny[0], photo, photo2)


def test_greedy_generate_equals_hf(tiny, photo2):
    checks.check_generate(*tiny, photo2)


def test_language_model_alone_equals_hf(tiny, photo):
    checks.check_language_model_alone(*tiny, photo)


def test_bad_inputs_are_refused(tiny, photo):
    checks.check_bad_inputs(tiny[0], photo)


def test_heatmap_lands_on_the_token_box(tiny):
    checks.check_heatmap_lands_on_the_token_box(tiny[0])


def test_deepstack_layer_axis_and_language_model(tiny, photo):
    checks.check_deepstack(*tiny, photo)
