"""The sweep's rows equal the cache-form analyses on PaliGemma 2 (a prefix-LM with per-token
inputs, on the naive engine) and SmolVLM (crops and a global image, on the kv engine).

The cache forms are checked against Hugging Face in test_analysis_readouts.py and
test_analysis_tokens.py; this checks the sweep's plumbing (prepare, per-token inputs, engine
record) for the families whose inputs differ most from LLaVA's (test_one_implementation.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.parity import analysis_refs as ref
from vlens import analysis as va
from vlens import sweep
from vlens.data import load_scenes
from vlens.prepare import UnknownWordsWarning

TOL = 1e-5
ANALYSES = ["modality_similarity", "attention_to_image", "token_count_curve"]
FRACTIONS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module", params=["paligemma2", "smolvlm"])
def tiny(request, tmp_path_factory):
    return ref.load_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_sweep_rows_equal_the_cache_forms(tiny, tmp_path):
    model = tiny.model
    scenes = load_scenes(2, seed=5, **model.adapter.scene_geometry().scene_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownWordsWarning)  # the tiny vocabulary lacks some scene words
        sweep.run(model, scenes, tmp_path / "run", ANALYSES, params={"token_count_curve": {"fractions": FRACTIONS}},
                  batch_size=2, progress=False, summarize=False)
    rows = sweep.load_results(tmp_path / "run")
    names = va.attention.required_hooks(model) + va.lens.required_hooks(model)
    for i, example in enumerate(scenes):
        inputs = model.prepare([example.load_image()], [example.prompt], answer=[example.answer])
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=names)
        sim = va.modality_similarity(model, cache, against="text_states", text="instruction").row(0)
        att = va.attention_to_image(cache, query="instruction").row(0)
        n = int(inputs.layout.image_mask.sum())
        counts = sorted({round(f * n) for f in FRACTIONS})
        curve = va.token_count_curve(model, inputs, counts=counts)
        row = rows.iloc[i]
        assert row["example_id"] == example.id
        np.testing.assert_allclose(row["modality_similarity.per_layer"], sim.per_layer.numpy(), atol=TOL)
        np.testing.assert_allclose(row["attention_to_image.mass"], att.mass.mean(-1).numpy(), atol=TOL)
        assert list(row["token_count_curve.counts"]) == counts
        np.testing.assert_allclose(row["token_count_curve.loss"], curve.loss[0].numpy(), atol=TOL)
        expected_engine = "naive" if model.adapter.per_token_inputs else "kv"
        assert row["token_count_curve.engine"] == curve.engine == expected_engine
