"""TokenLayout building: spans, masks and their consistency checks, on synthetic ids."""

from __future__ import annotations

import pytest
import torch

from vlens.errors import PromptError
from vlens.layout import assemble_layout, contiguous_runs, grid_span

IMG = 9


def ids_row(prefix: int, n_img: int, instr: int, answer: int, pad: int) -> list[int]:
    return [1] * prefix + [IMG] * n_img + [2] * instr + [3] * answer + [0] * pad


def test_grid_span_raster_and_labels():
    span = grid_span(0, torch.arange(5, 11), rows=2, cols=3)
    assert span.grid == (2, 3)
    assert span.row_col.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert span.labels[4] == "<img 1,1>"
    cls = grid_span(0, torch.arange(7), rows=2, cols=3, leading_cls=True)
    assert cls.labels[0] == "<img cls>" and cls.row_col[0].tolist() == [-1, -1]
    with pytest.raises(PromptError, match="needs 6"):
        grid_span(0, torch.arange(5), rows=2, cols=3)


def test_to_grid_places_values_and_marks_gaps():
    span = grid_span(0, torch.arange(4), rows=2, cols=2)
    grid = span.to_grid(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert grid.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="one value per image token"):
        span.to_grid(torch.ones(3))


def test_contiguous_runs():
    runs = contiguous_runs(torch.tensor([2, 3, 4, 8, 9, 12]))
    assert [r.tolist() for r in runs] == [[2, 3, 4], [8, 9], [12]]
    assert contiguous_runs(torch.tensor([], dtype=torch.long)) == []


def test_masks_partition_a_right_padded_batch():
    rows = [ids_row(2, 4, 3, 2, 0), ids_row(1, 4, 2, 1, 3)]
    input_ids = torch.tensor(rows)
    attention = (input_ids != 0).long()
    spans = [
        [grid_span(0, torch.arange(2, 6), 2, 2)],
        [grid_span(0, torch.arange(1, 5), 2, 2)],
    ]
    layout = assemble_layout(input_ids, attention, IMG, spans, answer_start=[9, 7])
    assert layout.lengths.tolist() == [11, 8]
    assert layout.prefix_mask[0].nonzero().flatten().tolist() == [0, 1]
    assert layout.instruction_mask[0].nonzero().flatten().tolist() == [6, 7, 8]
    assert layout.answer_mask[1].nonzero().flatten().tolist() == [7]
    assert layout.image_positions(1).tolist() == [1, 2, 3, 4]
    assert layout.mask("last")[1].nonzero().flatten().tolist() == [7]
    # Every real token is in exactly one of image / prefix / instruction / answer.
    parts = (
        layout.image_mask.long() + layout.prefix_mask.long() + layout.instruction_mask.long() + layout.answer_mask.long()
    )
    assert torch.equal(parts, attention)
    sub = layout.select([1])
    assert sub.batch_size == 1 and sub.images[0][0].positions.tolist() == [1, 2, 3, 4]


def test_spans_must_cover_the_placeholders_exactly():
    input_ids = torch.tensor([ids_row(1, 4, 1, 0, 0)])
    with pytest.raises(PromptError, match="cover 3 positions"):
        assemble_layout(input_ids, torch.ones_like(input_ids), IMG, [[grid_span(0, torch.arange(1, 4), 1, 3)]], [6])


def test_unknown_segment_name():
    input_ids = torch.tensor([ids_row(1, 1, 1, 0, 0)])
    layout = assemble_layout(input_ids, torch.ones_like(input_ids), IMG, [[grid_span(0, torch.tensor([1]), 1, 1)]], [3])
    with pytest.raises(ValueError, match="unknown segment 'question'"):
        layout.mask("question")
