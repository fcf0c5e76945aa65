"""The causal views on synthetic results: one panel per layer laid out on the image grid, a
knockout curve per window size, and refusals."""

from __future__ import annotations

import pytest
import torch

from vlens.analysis.flow_knockout import KnockoutResult
from vlens.analysis.patching import PatchingResult
from vlens.errors import AnalysisInputError
from vlens.layout import assemble_layout, grid_span
from vlens.viz.causal import knockout_figure, patching_heatmaps, patching_values


def _layout():
    ids = torch.tensor([[1, 9, 9, 9, 9, 2, 3]])
    span = grid_span(0, torch.arange(1, 5), 2, 2)
    return assemble_layout(ids, torch.ones_like(ids), 9, [[span]], answer_start=[6])


def _patching(values: torch.Tensor, positions: list[int]) -> PatchingResult:
    n_layer, n_pos = values.shape
    one = torch.zeros(1)
    return PatchingResult(
        kinds=("resid_pre",), layers=torch.arange(n_layer), positions=torch.tensor([positions]),
        logit_diff=values[None, None], prob=values[None, None], clean_logit_diff=one + 1, corrupted_logit_diff=one,
        clean_prob=one, corrupted_prob=one, target=torch.tensor([3]), foil=torch.tensor([2]),
        predictor=torch.tensor([5]), engine="kv",
    )


def test_patching_values_follow_the_grid_and_leave_unpatched_tokens_nan():
    layout = _layout()
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    result = _patching(values, [2, 3, 4])  # the first image token was not patched
    panels = patching_values(result, layout, "resid_pre", "logit_diff")
    assert [title for title, _ in panels] == ["layer 0", "layer 1"]
    first = panels[0][1]
    assert torch.isnan(first[0]) and first[1:].tolist() == [1.0, 2.0, 3.0]
    grid = layout.images[0][0].to_grid(panels[1][1])
    assert grid[1, 1] == 6.0 and grid[0, 1] == 4.0
    assert patching_heatmaps(result, layout, value="normalized").axes
    with pytest.raises(AnalysisInputError, match="not 'mlp_out'"):
        patching_values(result, layout, "mlp_out", "prob")
    with pytest.raises(AnalysisInputError, match="none of image 0"):
        patching_values(_patching(values, [5, 6, 0]), layout, "resid_pre", "prob")


def test_knockout_figure_draws_one_line_per_window_size():
    result = KnockoutResult(
        window_start=torch.tensor([0, 1, 2, 0, 1]), window_size=torch.tensor([1, 1, 1, 2, 2]),
        logprob=torch.tensor([[-1.0, -2.0, -1.5, -3.0, -2.5]]), clean_logprob=torch.tensor([-1.0]),
        n_blocked=torch.tensor([4]), query="predictor", key="image", route="scores", engine="kv",
    )
    fig = knockout_figure(result)
    assert len(fig.axes[0].lines) == 3  # two sizes and the zero line
    assert result.delta_logprob[0, 1] == -1.0
    assert result.to_frame()[["start", "size"]].values.tolist()[3] == [0, 2]
