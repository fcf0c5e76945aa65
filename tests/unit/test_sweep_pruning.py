"""The sweep's prune_visual_tokens entry: the analysis's own values per example, summarised."""

from __future__ import annotations

import numpy as np
import pytest

from vlens import analysis as va
from vlens import sweep
from vlens.data import load_scenes


def test_pruning_rows_equal_the_analysis(llava_model, tmp_path):
    scenes = load_scenes(3, seed=4)
    params = {"prune_visual_tokens": {"layers": [1, 2], "keep": [0.5, 1.0], "rankings": ["attention", "random"]}}
    report = sweep.run(llava_model, scenes, tmp_path / "run", ["prune_visual_tokens"], params=params,
                       batch_size=2, progress=False)
    assert report.errors == 0
    rows = sweep.load_results(tmp_path / "run")
    entry = sweep.ANALYSES["prune_visual_tokens"](**params["prune_visual_tokens"])
    assert entry.grid[:3] == ["attention/K1/keep0.5", "attention/K1/keep1", "attention/K2/keep0.5"]
    for i, example in enumerate(scenes):
        inputs = llava_model.prepare(example.image, example.prompt, answer=example.answer)
        # Row i of its batch: the random ranking is seeded by seed + row.
        alone = va.prune_visual_tokens(llava_model, inputs, seed=i % 2, **params["prune_visual_tokens"])
        row = rows.iloc[i]
        np.testing.assert_allclose(row["prune_visual_tokens.loss"], alone.loss[0].flatten().numpy(), atol=1e-4)
        np.testing.assert_array_equal(row["prune_visual_tokens.exact"], alone.exact[0].float().flatten().numpy())
        assert row["answer_loss"] == pytest.approx(float(alone.full_loss[0]), abs=1e-4)
    curves = report.summary.curves.query("analysis == 'prune_visual_tokens' and field == 'flops_ratio'")
    assert len(curves) == 8 and (curves["mean"] <= 1.0).all()
