"""The HTML report on tiny models: every section, its data, and visible notes for gaps."""

from __future__ import annotations

import re
import sys

import pandas as pd
import pytest

import vlens.analysis as va
from tests.tiny.families import FAMILY_BUILDERS
from vlens import HookedVLM
from vlens.viz.report import build_report, count_grid, report_inputs

SECTIONS = [
    "input", "lens", "similarity", "attention", "patterns", "count", "contributions", "knockout", "patching",
    "pruning", "contextual_lens",
]


@pytest.fixture(scope="module")
def llava_inputs(llava_model, photo):
    return llava_model.prepare(photo, "what colour is the object ?", answer="a red circle .")


@pytest.fixture(scope="module")
def llava_report(llava_model, llava_inputs):
    return build_report(llava_model, llava_inputs, meta={"image": "photo"})


def test_report_has_every_section_and_no_problem(llava_report):
    assert [s.key for s in llava_report.sections] == SECTIONS
    assert llava_report.problems == {}
    html = llava_report.to_html()
    for key in SECTIONS:
        assert f'<section id="{key}">' in html
    assert html.count('data-vlens="circuitsvis-bundle"') == 1
    assert 'class="note skipped"' not in html
    figures = re.findall(r'<img class="figure" alt="[^"]*" src="data:image/png;base64,', html)
    assert len(figures) >= 7
    # Self-contained: nothing is loaded from anywhere but the page itself.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "&lt;img 0,0&gt;" in html  # the token strip shows image tokens by their grid label


def test_report_writes_page_and_tables(llava_report, tmp_path):
    written = llava_report.write(tmp_path / "out")
    assert written["report"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    expected = {"tokens", "lens", "similarity", "similarity_curve", "attention_mass", "attention_received", "count_curve", "contributions"}
    assert expected <= set(written) - {"report"}
    lens = pd.read_csv(written["lens"])
    assert {"layer", "pos", "rank", "token_id", "logprob", "token"} <= set(lens.columns)
    tokens = pd.read_csv(written["tokens"])
    assert tokens.loc[tokens.segment == "image", "token"].iloc[0] == "<img 0,0>"
    parquet = llava_report.write(tmp_path / "pq", data_format="parquet")
    assert pd.read_parquet(parquet["count_curve"]).shape == pd.read_csv(written["count_curve"]).shape


def test_failing_analysis_is_a_visible_error(llava_model, llava_inputs, monkeypatch):
    # The report's analyses are imported, never optional; one that fails on a model is a note.
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(va, "SimilarityStream", broken)
    messages = []
    report = build_report(llava_model, llava_inputs, progress=messages.append)
    assert report.problems == {"Visual vs text similarity per layer": "Failed: RuntimeError: boom"}
    assert "RuntimeError: boom" in report.to_html()
    assert any("logit lens" in m for m in messages) and any("done in" in m for m in messages)


def test_report_inputs_generates_a_missing_answer(llava_model, photo):
    inputs, meta = report_inputs(llava_model, photo, "what colour is the object ?", max_new_tokens=3)
    assert inputs.answers[0] and meta["answer source"].startswith("generated")
    inputs, meta = report_inputs(llava_model, photo, "what colour is the object ?", "red .")
    assert inputs.answers[0] == "red ." and meta["answer source"] == "given"


def test_count_grid():
    assert count_grid(16) is None
    grid = count_grid(576)
    assert grid[0] == 0 and grid[-1] == 576 and len(grid) < 40 and grid == sorted(set(grid))


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_report_on_every_family(family, tmp_path, photo):
    model = HookedVLM.from_pretrained(FAMILY_BUILDERS[family](tmp_path / family), device="cpu")
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    report = build_report(model, inputs)
    assert report.problems == {}
    assert [s.key for s in report.sections] == SECTIONS


def test_views_and_report_have_no_side_effects(llava_model, llava_inputs, monkeypatch, capsys):
    """No network, no subprocess, no printing, no pyplot figure left behind."""
    import os
    import socket
    import subprocess

    import matplotlib

    from vlens.viz import attention_view

    def refuse(*args, **kwargs):
        raise AssertionError(f"a view tried to reach outside: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    report = build_report(llava_model, llava_inputs)
    _, cache = llava_model.run_with_cache(llava_inputs, names_filter="blocks.*.attn.hook_pattern")
    view = attention_view(cache, llava_model.to_str_tokens(llava_inputs))
    assert report.problems == {} and view._repr_html_().startswith('<script data-vlens="circuitsvis-bundle">')
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
