"""The report on the toy model and its default scene, read from its HTML and data files: the
greedy answer in the header is the model's, the per-block maps share one colour scale with a
colour bar, every figure has a reading guide, no figure is empty without a note, and every
contribution number stands beside its sign convention. (``test_report_browser.py`` checks the
same facts on the page Chromium rendered.)"""

from __future__ import annotations

import re

import pytest

from tests.acceptance import report_facts as facts


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from click.testing import CliRunner

    from vlens.cli import main

    out = tmp_path_factory.mktemp("report") / "report"
    result = CliRunner().invoke(main, ["report", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, (out / "report.html").read_text(encoding="utf-8")


def test_header_shows_the_models_own_greedy_answer(written):
    from vlens.data import CAPTION_QUESTION, generate_scene
    from vlens.zoo import toy_checkpoint_path

    _, page = written
    reference = facts.greedy_answer(toy_checkpoint_path(), generate_scene(0).image, CAPTION_QUESTION)
    assert reference, "the reference loop produced no answer"
    assert facts.meta_value(page, "model's greedy answer") == reference


def test_per_block_maps_share_one_colour_scale(written):
    facts.assert_shared_colour_scale(written[1])


def test_no_figure_is_empty_without_a_note(written):
    out, page = written
    facts.assert_no_figure_empty_without_a_note(page, out / "data")


def test_lens_says_which_labels_it_used(written):
    _, page = written
    assert "per-patch ground truth" in facts.meta_value(page, "lens labels")
    assert re.search(r'id="lens-labels">Labels: .*\d+ of 64 image tokens are labelled', page)


def test_contribution_numbers_stand_beside_their_sign_convention(written):
    _, page = written
    section = page[page.index('<section id="contributions">'):]
    section = section[: section.index("</section>")]
    assert "positive = the token helps" in section
    caption = facts.figures(page)["fig-contributions"]["caption"]
    assert "(> 0)" in caption and "the token helps" in caption
    # Each number in the table of largest effects says what its sign means.
    rows = re.findall(r"<tr><td class=\"l\">[^<]*</td><td>([-0-9.e+]+)</td><td class=\"l\">([^<]*)</td></tr>", section)
    assert rows
    for value, meaning in rows:
        assert meaning == ("helps (removing it raises the loss)" if float(value) > 0 else "removing it lowers the loss")
