"""The causal commands through click's runner, on the shipped toy model and generated scenes."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from vlens.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", ["knockout", "patching", "attribution"])
def test_help_has_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_knockout_writes_its_table_and_figure(tmp_path):
    result = run("knockout", "--query", "instruction", "--key", "image", "--sizes", "1,2",
                 "--table", tmp_path / "k.csv", "--figure", tmp_path / "k.png")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "k.csv")
    assert sorted(set(frame["size"])) == [1, 2] and (tmp_path / "k.png").stat().st_size > 0


def test_patching_and_attribution_against_another_scene(tmp_path):
    result = run("patching", "--kinds", "resid_pre", "--layers", "0,3", "--corrupt-seed", "2",
                 "--table", tmp_path / "p.csv", "--figure", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "p.csv")
    assert sorted(set(frame["layer"])) == [0, 3] and set(frame["kind"]) == {"resid_pre"}
    result = run("attribution", "--kinds", "resid_pre", "--exact")
    assert result.exit_code == 0, result.output
    assert "Spearman rank correlation with exact patching, resid_pre:" in result.output


def test_patching_refuses_a_prompt_of_another_length():
    result = run("patching", "--corrupt-prompt", "describe the image in many more words .")
    assert result.exit_code == 1 and "tokenised differently" in result.stderr
