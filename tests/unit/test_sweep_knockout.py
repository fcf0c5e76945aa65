"""The sweep's attention_knockout entry: its columns are vlens.analysis.attention_knockout's values."""

from __future__ import annotations

import numpy as np
import pytest

from vlens import analysis as va
from vlens import sweep
from vlens.sweep.analyses import build_analyses
from vlens.data import load_scenes
from vlens.errors import AnalysisInputError


def test_sweep_knockout_columns_equal_the_analysis(llava_model, tmp_path):
    scenes = load_scenes(3, seed=3)
    params = {"attention_knockout": {"query": "predictor", "key": "image", "sizes": [1, 2]}}
    sweep.run(llava_model, scenes, tmp_path / "run", ["attention_knockout"], params=params, batch_size=2, progress=False)
    rows = sweep.load_results(tmp_path / "run")
    n = llava_model.n_layers
    windows = va.layer_windows(n, (1, 2))
    ex = scenes[2]
    inputs = llava_model.prepare(ex.load_image(), ex.prompt, answer=ex.answer)
    expected = va.attention_knockout(llava_model, inputs, "predictor", "image", windows=windows)
    assert list(rows["attention_knockout.window_start"][2]) == [w[0] for w in windows]
    assert list(rows["attention_knockout.window_size"][2]) == [w[1] for w in windows]
    np.testing.assert_allclose(rows["attention_knockout.delta_logprob"][2], expected.delta_logprob[0].numpy(), atol=1e-5)
    assert rows["attention_knockout.engine"][2] == "kv"


def test_sweep_knockout_refuses_an_unknown_span():
    with pytest.raises(AnalysisInputError, match="not a span name"):
        build_analyses(["attention_knockout"], {"attention_knockout": {"key": "pixels"}})
