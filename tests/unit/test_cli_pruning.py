"""``vlens prune`` and ``vlens contextual-lens`` on the tiny LLaVA: tables, figures, files, errors."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from vlens.cli import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_prune_prints_the_grid_and_writes_its_files(runner, llava_dir, tmp_path):
    result = run(runner, "prune", "--model", llava_dir, "--layers", "1,2", "--keep", "0.5,1",
                 "--rankings", "attention,random,contribution", "--figure", tmp_path / "p.png", "--table", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert "flops_ratio" in result.stdout and "contribution" in result.stdout
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    frame = pd.read_csv(tmp_path / "p.csv")
    assert len(frame) == 3 * 2 * 2 and set(frame["ranking"]) == {"attention", "random", "contribution"}
    assert (frame.loc[frame["keep"] == 1.0, "flops_ratio"] == 1.0).all()


def test_contextual_lens_reads_a_contexts_file(runner, llava_dir, tmp_path):
    contexts = tmp_path / "captions.txt"
    contexts.write_text("a red circle .\n\na big blue square on the left .\n", encoding="utf-8")
    result = run(runner, "contextual-lens", "--model", llava_dir, "--contexts", contexts, "--layers", "0,2", "-k", 2,
                 "--figure", tmp_path / "c.png", "--table", tmp_path / "c.csv")
    assert result.exit_code == 0, result.output
    assert "nearest words (count)" in result.stdout and "from 2 contexts" in result.stderr
    frame = pd.read_csv(tmp_path / "c.csv")
    assert {"token", "similarity", "context", "offset"} <= set(frame.columns)
    assert set(frame["context"]) <= {0, 1} and (tmp_path / "c.png").is_file()


def test_bad_arguments_are_one_line_errors(runner, llava_dir, tmp_path):
    bad = run(runner, "prune", "--model", llava_dir, "--rankings", "fastest")
    assert bad.exit_code == 1 and "'fastest'" in bad.stderr and "Traceback" not in bad.output
    keep = run(runner, "prune", "--model", llava_dir, "--keep", "half")
    assert keep.exit_code == 2 and "half" in keep.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    none = run(runner, "contextual-lens", "--model", llava_dir, "--contexts", empty)
    assert none.exit_code == 1 and "no non-empty line" in none.stderr
