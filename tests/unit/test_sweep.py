"""vlens.sweep in one process on the tiny random LLaVA: rows, resume, provenance, memory, errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from vlens import sweep
from vlens.data import Example, ExampleSet, load_jsonl, load_scenes
from vlens.errors import AnalysisInputError, DatasetError, MemoryBudgetError, SweepConfigError
from vlens.cli import main as vlens_main
from vlens.cli.sweep import load_data, parse_params, sweep_command
from vlens.sweep import store
from vlens.sweep.memory import parse_bytes

from tests.unit.test_loaders import FIX, IMAGES

ALL = ["modality_similarity", "attention_to_image", "logit_lens", "token_count_curve"]


@pytest.fixture(scope="module")
def scenes():
    return load_scenes(5, seed=3)


@pytest.fixture(scope="module")
def swept(llava_model, scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    report = sweep.run(llava_model, scenes, out, ALL, batch_size=2, progress=False)
    return out, report


def frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a["example_id"]) == list(b["example_id"])
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        for x, y in zip(a[col], b[col]):
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                np.testing.assert_array_equal(x, y)
            elif isinstance(x, float) and math.isnan(x):
                assert isinstance(y, float) and math.isnan(y)
            else:
                assert x == y, col


def test_rows_columns_and_summary(llava_model, swept, scenes):
    out, report = swept
    assert report.total == report.processed == 5 and report.already_done == 0 and report.errors == 0
    rows = sweep.load_results(out)
    assert list(rows["example_id"]) == list(scenes.ids) and list(rows["index"]) == list(range(5))
    n = llava_model.n_layers
    row = rows.iloc[0]
    assert len(row["modality_similarity.per_layer"]) == n + 1
    assert len(row["attention_to_image.mass"]) == n
    assert len(row["logit_lens.match"]) == n + 1 and row["logit_lens.final_agreement"][-1] == 1.0
    assert list(row["token_count_curve.counts"]) == [0, 4, 8, 12, 16] and row["n_image_tokens"] == 16
    assert row["token_count_curve.loss"][-1] == pytest.approx(row["answer_loss"], abs=1e-4)
    assert len(list((out / "shards").glob("*.parquet"))) == 3  # one shard per batch
    assert not list(out.rglob(".tmp-*"))
    summary = report.summary
    sim = summary.curves.query("analysis == 'modality_similarity'")
    assert list(sim["x"]) == list(range(n + 1)) and (sim["n"] == 5).all()
    expected = np.mean(np.stack(rows["modality_similarity.per_layer"]), 0)
    np.testing.assert_allclose(sim["mean"], expected, rtol=1e-6)
    assert (sim["ci_low"] <= sim["mean"]).all() and (sim["mean"] <= sim["ci_high"]).all()
    assert (out / "summary.csv").is_file() and json.loads((out / "summary.json").read_text())["n_examples"] == 5
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["dataset"]["size"] == 5 and prov["dataset"]["kind"] == "scenes"
    assert prov["model"]["config_hash"] == store.config_hash(llava_model)
    assert set(prov["versions"]) >= {"vlens", "transformer-lens", "transformers"}
    assert [a["name"] for a in prov["analyses"]] == ALL


def test_rerun_skips_finished_examples(llava_model, swept, scenes):
    out, _ = swept
    before = sweep.load_results(out)
    report = sweep.run(llava_model, scenes, out, ALL, batch_size=2, progress=False)
    assert report.already_done == 5 and report.processed == 0
    frames_equal(before, sweep.load_results(out))


def test_resume_after_lost_shard_and_other_batch_size(llava_model, swept, scenes, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept[0], out)
    before = sweep.load_results(out)
    lost = sorted((out / "shards").glob("*.parquet"))[1]
    lost.unlink()
    (out / "shards" / ".tmp-deadbeef-half.parquet").write_bytes(b"half a shard")  # a killed write
    report = sweep.run(llava_model, scenes, out, ALL, batch_size=2, progress=False)
    assert report.processed == 2 and not list(out.rglob(".tmp-*"))
    frames_equal(before, sweep.load_results(out))
    for path in sorted((out / "shards").glob("*.parquet"))[:2]:
        path.unlink()
    report = sweep.run(llava_model, scenes, out, ALL, batch_size=3, progress=False)  # other batches: close, not equal
    after = sweep.load_results(out)
    assert list(after["example_id"]) == list(scenes.ids)
    np.testing.assert_allclose(np.stack(after["modality_similarity.per_layer"]),
                               np.stack(before["modality_similarity.per_layer"]), atol=1e-5)


def test_streaming_equals_cache_form(llava_model, swept, scenes, tmp_path):
    params = {a: {"stream": False} for a in ALL[:3]}
    sweep.run(llava_model, scenes, tmp_path / "cached", ALL[:3], params=params, batch_size=2, progress=False)
    cached, streamed = sweep.load_results(tmp_path / "cached"), sweep.load_results(swept[0])
    for col in cached.columns:
        if "." in col:
            np.testing.assert_allclose(np.stack(cached[col]), np.stack(streamed[col]), atol=1e-6, err_msg=col)


def test_values_match_vlens_analysis(llava_model, swept, scenes):
    from vlens import analysis as va

    rows = sweep.load_results(swept[0])
    ex = scenes[1]
    inputs = llava_model.prepare(ex.load_image(), ex.prompt, answer=ex.answer)
    _, cache = llava_model.run_with_cache(inputs)
    sim = va.modality_similarity(llava_model, cache, against="text_states", text="instruction").row(0)
    np.testing.assert_allclose(rows["modality_similarity.per_layer"][1], sim.per_layer.numpy(), atol=1e-5)
    att = va.attention_to_image(cache, query="instruction").row(0)
    np.testing.assert_allclose(rows["attention_to_image.mass"][1], att.mass.mean(-1).numpy(), atol=1e-5)
    lens = va.logit_lens(llava_model, cache, positions="image", k=5).row(0)
    top1 = lens.top_ids[..., 0]
    np.testing.assert_allclose(rows["logit_lens.final_agreement"][1], (top1 == top1[-1]).float().mean(-1).numpy())


def test_provenance_mismatch_refused_naming_the_field(llava_model, swept, scenes):
    out, _ = swept
    with pytest.raises(SweepConfigError, match=r"analyses.logit_lens.params.k: folder has 5, this run has 3"):
        sweep.run(llava_model, scenes, out, ALL, params={"logit_lens": {"k": 3}}, progress=False)
    with pytest.raises(SweepConfigError, match=r"dataset\.(fingerprint|size)"):
        sweep.run(llava_model, load_scenes(4, seed=3), out, ALL, progress=False)
    with pytest.raises(SweepConfigError, match="chat_template"):
        sweep.run(llava_model, scenes, out, ALL, chat_template=False, progress=False)


def test_memory_estimate_and_budget(llava_model, scenes, tmp_path):
    stream = sweep.estimate_memory(llava_model, sweep.analyses.build_analyses(ALL[:3]), 8, 48, 16)
    cached = sweep.estimate_memory(
        llava_model, sweep.analyses.build_analyses(ALL[:3], {a: {"stream": False} for a in ALL[:3]}), 8, 48, 16)
    assert cached.total > stream.total and cached.weights == stream.weights > 0
    assert cached.analyses["attention_to_image"] > stream.analyses["attention_to_image"]
    assert "weights" in str(stream)
    refused = r"needs an estimated .* budget is 100\.0 KiB.*Non-streaming \(stream=False\) analyses: attention_to_image"
    with pytest.raises(MemoryBudgetError, match=refused):
        sweep.run(llava_model, scenes, tmp_path / "m", ["attention_to_image"],
                  params={"attention_to_image": {"stream": False}}, memory_budget="100KB", progress=False)
    assert not (tmp_path / "m" / "shards").exists()  # refused before any batch ran
    assert parse_bytes("1.5GB") == 1.5 * 1024**3 and parse_bytes("off") == float("inf") and parse_bytes(None) is None
    with pytest.raises(SweepConfigError, match="memory_budget"):
        parse_bytes("lots")


def test_unreadable_image_skipped_and_reported(llava_model, tmp_path):
    path = tmp_path / "p.jsonl"
    recs = [{"id": "good", "image": "a.png", "prompt": "what is in the image ?", "answer": "a cat"},
            {"id": "bad", "image": "broken.png", "prompt": "what is in the image ?"},
            {"id": "gone", "image": "missing.png", "prompt": "what"}]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    data = load_jsonl(path, IMAGES, check_images=False, skip_bad=True)  # 'gone' is skipped at load time
    with pytest.raises(DatasetError, match="example 'bad'"):
        sweep.run(llava_model, data, tmp_path / "strict", ["modality_similarity"], progress=False)
    report = sweep.run(llava_model, data, tmp_path / "lenient", ["modality_similarity"], skip_bad=True,
                       progress=False)
    assert report.errors == 1
    rows = sweep.load_results(tmp_path / "lenient")
    assert list(rows["example_id"]) == ["good", "bad"]
    assert pd.isna(rows["error"][0]) and "cannot be read" in rows["error"][1]
    skipped = {s.id: s.reason for s in report.summary.skipped}
    assert set(skipped) == {"line 3 (id 'gone')", "bad"} and "does not exist" in skipped["line 3 (id 'gone')"]
    assert report.summary.n_examples == 1


def test_bad_arguments(llava_model, scenes, tmp_path):
    with pytest.raises(AnalysisInputError, match="unknown sweep analysis 'lens'"):
        sweep.run(llava_model, scenes, tmp_path / "x", ["lens"])
    with pytest.raises(AnalysisInputError, match="bad parameters for logit_lens"):
        sweep.run(llava_model, scenes, tmp_path / "x", ["logit_lens"], params={"logit_lens": {"top": 3}})
    with pytest.raises(AnalysisInputError, match="not in the sweep"):
        sweep.run(llava_model, scenes, tmp_path / "x", ["logit_lens"], params={"attention_to_image": {}})
    with pytest.raises(SweepConfigError, match="batch_size"):
        sweep.run(llava_model, scenes, tmp_path / "x", batch_size=0)
    with pytest.raises(SweepConfigError, match="already loaded"):
        sweep.run(llava_model, scenes, tmp_path / "x", device="cpu")
    with pytest.raises(SweepConfigError, match="ExampleSet"):
        sweep.run(llava_model, "images/", tmp_path / "x")
    img = scenes[0].image
    report = sweep.run(llava_model, [Example("one", img, "describe the image .")], tmp_path / "list",
                       ["attention_to_image"], progress=False)
    assert report.processed == 1


def test_cli_runs_resumes_and_summarizes(llava_dir, tmp_path):
    from click.testing import CliRunner

    def cli(*argv: str):
        return CliRunner().invoke(vlens_main, ["sweep", *argv], catch_exceptions=False)

    base = ["--model", str(llava_dir), "--data-format", "jsonl", "--data", str(FIX / "prompts.jsonl"),
            "--images", str(IMAGES), "--prompt", "what is in the image ?", "--out", str(tmp_path / "c"),
            "--analyses", "logit_lens,attention_to_image", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    first = cli(*base, "--param", "logit_lens.k=2")
    assert first.exit_code == 0, first.output
    assert "3 examples" in first.stdout
    rows = sweep.load_results(tmp_path / "c")
    assert list(rows["example_id"]) == ["x1", "x2", "line 3"]
    assert not np.isnan(rows["logit_lens.object_hit"][0]).any() and np.isnan(rows["logit_lens.object_hit"][1]).all()
    assert cli("--out", str(tmp_path / "c"), "--summarize-only").exit_code == 0
    refused = cli(*base, "--param", "logit_lens.k=3")
    assert refused.exit_code == 1  # a vlens error, as in every vlens command (2 is for click's usage errors)
    assert "logit_lens.params.k" in refused.stderr
    assert parse_params(["a.b=1", "a.c=x", "a.d=[0.5, 1]"]) == {"a": {"b": 1, "c": "x", "d": [0.5, 1]}}
    with pytest.raises(SweepConfigError, match="ANALYSIS.KEY=VALUE"):
        parse_params(["k=3"])


def test_sweep_command_runs_in_any_click_group(swept):
    import click
    from click.testing import CliRunner

    group = click.Group("vlens", commands=[sweep_command])
    result = CliRunner().invoke(group, ["sweep", "--out", str(swept[0]), "--summarize-only"])
    assert result.exit_code == 0 and "5 examples" in result.output
    assert CliRunner().invoke(group, ["sweep", "--help"]).output.startswith("Usage: vlens sweep")


def test_lens_labels_image_tokens_from_boxes(llava_model):
    from vlens.analysis.lens import label_id
    from vlens.sweep.analyses import Batch, LogitLens, box_labels

    img = PIL_image(28, 28)
    ex = Example("e", img, "what is in the image ?", objects=("cat", "dog", "zebra"),
                 boxes=((0, 0, 14, 28), (0, 0, 28, 28), (14, 14, 14, 14)))
    inputs = llava_model.prepare(img, ex.prompt)
    tok = llava_model.tokenizer
    labels = box_labels(llava_model, Batch(inputs, [ex], [img]), 0, lambda word: label_id(tok, word))
    cat, dog = tok.convert_tokens_to_ids("cat"), tok.convert_tokens_to_ids("dog")
    span = inputs.layout.images[0][0]
    # The smallest box holding a patch's centre names it; 'zebra' is <unk>, so its patches get no label.
    want = [-1 if (r >= 2 and c >= 2) else cat if c < 2 else dog for r, c in span.row_col.tolist()]
    assert labels.tolist() == want
    assert [label_id(tok, w) for w in ex.objects] == [cat, dog, -1]
    # The sweep's match column is LensResult.match with those labels.
    lens = LogitLens(k=2)
    batch = Batch(inputs, [ex], [img])
    with llava_model.hooks(lens.hooks(llava_model, batch)):
        llava_model(inputs)
    (row,) = lens.rows(llava_model, batch)
    expected = lens.stream_for(llava_model).last_batch.match(labels[None])[0]
    assert row["logit_lens.match"] == expected.tolist()


def test_model_by_path_with_device_map(llava_dir, scenes, tmp_path):
    report = sweep.run(llava_dir, scenes, tmp_path / "dm", ["attention_to_image"], device_map={"": "cpu"},
                       progress=False)
    assert report.processed == 5
    prov = json.loads((tmp_path / "dm" / "provenance.json").read_text())
    assert prov["model"]["name"] == str(llava_dir.resolve())


def PIL_image(w: int, h: int):
    import PIL.Image

    return PIL.Image.new("RGB", (w, h), (120, 60, 30))


def test_sweep_starts_no_process_and_opens_no_connection(llava_model, scenes, tmp_path, monkeypatch):
    import os
    import socket
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"vlens.sweep tried to start a process or open a connection: {args[:2]!r}")

    for module, names in ((subprocess, ("Popen", "run")), (os, ("system", "fork", "posix_spawn", "execv")),
                          (socket, ("create_connection",)), (socket.socket, ("connect",))):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    report = sweep.run(llava_model, scenes, tmp_path / "quiet", ALL, batch_size=3, progress=True)
    assert report.processed == 5 and report.summary.figures


def test_example_the_processor_refuses_is_skipped_and_reported(llava_model, scenes, tmp_path):
    img = scenes[0].image
    data = [Example("fine", img, "what is in the image ?"), Example("two-images", img, "<image> <image> what ?"),
            Example("also-fine", img, "describe the image .")]
    with pytest.raises(Exception, match="image"):
        sweep.run(llava_model, data, tmp_path / "strict", ["attention_to_image"], progress=False)
    report = sweep.run(llava_model, data, tmp_path / "lenient", ["attention_to_image"], skip_bad=True,
                       progress=False)
    rows = sweep.load_results(tmp_path / "lenient")
    assert report.errors == 1 and list(rows["example_id"]) == ["fine", "two-images", "also-fine"]
    assert rows["error"][1].startswith("cannot be prepared") and report.summary.n_examples == 2


def test_summary_count_curve_on_fractions(swept):
    curves = sweep.summarize(swept[0], figures=False).curves
    count = curves.query("analysis == 'token_count_curve' and field == 'loss'")
    assert list(count["x_value"]) == [0.0, 0.25, 0.5, 0.75, 1.0] and (count["n"] == 5).all()
    assert list(curves.query("analysis == 'attention_to_image' and field == 'mass'")["x_value"]) == [0.0, 1.0, 2.0]


def test_cli_data_formats(tmp_path):
    import PIL.Image

    def data(*argv: str) -> ExampleSet:
        with sweep_command.make_context("sweep", ["--out", str(tmp_path / "o"), *argv]) as ctx:
            return load_data(ctx.params)

    assert data("--data", "7", "--limit", "3").ids == load_scenes(3).ids
    coco = data("--data-format", "coco", "--data", str(FIX / "coco_captions.json"), "--images", str(IMAGES),
                "--instances", str(FIX / "coco_instances.json"), "--prompt", "what ?")
    assert coco.kind == "coco_captions" and coco[0].objects == ("dog", "cat") and coco[0].prompt == "what ?"
    assert len(data("--data-format", "coco", "--data", str(FIX / "coco_bad.json"), "--images", str(IMAGES),
                    "--skip-bad")) == 1
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"img": [PIL.Image.open(IMAGES / "a.png")], "q": ["what ?"]}).save_to_disk(
        tmp_path / "hf")
    hf = data("--data-format", "hf", "--data", str(tmp_path / "hf"), "--image-column", "img", "--prompt-column", "q")
    assert hf.kind == "hf_dataset" and hf[0].prompt == "what ?"
    with pytest.raises(SweepConfigError, match="--images"):
        data("--data-format", "coco", "--data", str(FIX / "coco_captions.json"))
    with pytest.raises(SweepConfigError, match="number of scenes"):
        data("--data", "many")
