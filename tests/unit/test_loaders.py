"""Data-set loaders on small fixture files, including every bad-record case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import PIL.Image
import pytest

from vlens.data import Example, ExampleSet, Skipped, load_coco_captions, load_hf_dataset, load_jsonl, load_scenes
from vlens.errors import DatasetError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "loaders"
IMAGES = FIX / "images"


def reasons(data: ExampleSet) -> dict[str, str]:
    return {s.id: s.reason for s in data.skipped}


# ---- COCO ---------------------------------------------------------------------------


def test_coco_examples_labels_and_first_caption():
    data = load_coco_captions(FIX / "coco_captions.json", IMAGES, prompt="Describe it.")
    assert data.ids == ("1", "2", "3") and data.skipped == ()
    first = data[0]
    assert first.answer == "A small red square."  # lowest annotation id wins
    assert first.prompt == "Describe it." and first.image == IMAGES / "a.png"
    assert data[2].answer is None and data[2].objects == ("cat",) and data[2].boxes == ((1.0, 2.0, 4.0, 5.0),)
    assert first.load_image().mode == "RGB" and first.load_image().size == (16, 12)
    assert load_coco_captions(FIX / "coco_captions.json", IMAGES, answer="none")[0].answer is None


def test_coco_instances_file_gives_objects_and_boxes():
    data = load_coco_captions(FIX / "coco_captions.json", IMAGES, instances=FIX / "coco_instances.json")
    assert data[0].objects == ("dog", "cat")
    assert data[0].boxes == ((0.0, 0.0, 8.0, 6.0), (8.0, 6.0, 8.0, 6.0))


def test_coco_bad_records_raise_naming_the_record():
    with pytest.raises(DatasetError, match=r"images\[3\].*'file_name'") as info:
        load_coco_captions(FIX / "coco_bad.json", IMAGES)
    assert info.value.record == "images[3]"


def test_coco_bad_records_skipped_and_reported():
    data = load_coco_captions(FIX / "coco_bad.json", IMAGES, skip_bad=True)
    assert data.ids == ("1",) and data[0].answer == "fine"
    why = reasons(data)
    assert "file_name" in why["images[3]"]
    assert why["image 1"] == "duplicate id"
    assert "not in 'images'" in why["annotations[1] (id 2)"]
    assert "non-empty string" in why["annotations[2] (id 3)"]
    assert "[x, y, w, h]" in why["annotations[3] (id 4)"]
    assert "category_id 8" in why["annotations[4] (id 5)"]
    assert "'caption' or a 'bbox'" in why["annotations[5] (id 6)"]
    assert "'image_id'" in why["annotations[6] (id 7)"]
    assert "does not exist" in why["image 4"]
    assert "cannot be read" in why["image 5"]
    assert len(data.skipped) == 10  # every bad record is listed, none dropped silently


def test_coco_missing_and_malformed_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_coco_captions(tmp_path / "nope.json", IMAGES)
    with pytest.raises(DatasetError, match="image folder"):
        load_coco_captions(FIX / "coco_captions.json", tmp_path / "nope")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco_captions(tmp_path / "x.json", IMAGES)
    (tmp_path / "y.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="'annotations' lists"):
        load_coco_captions(tmp_path / "y.json", IMAGES)
    with pytest.raises(DatasetError, match="answer must be"):
        load_coco_captions(FIX / "coco_captions.json", IMAGES, answer="all")


# ---- JSONL --------------------------------------------------------------------------


def test_jsonl_examples():
    data = load_jsonl(FIX / "prompts.jsonl", IMAGES, prompt="Default?")
    assert data.ids == ("x1", "x2", "line 3")
    assert data[0].objects == ("cat", "dog") and len(data[0].boxes) == 2 and data[0].answer == "a cat"
    assert data[2].prompt == "Default?" and data[2].answer == "a dog"
    assert load_jsonl(FIX / "prompts.jsonl", IMAGES, prompt="Default?", limit=2).ids == ("x1", "x2")


def test_jsonl_default_image_folder_is_the_files_folder(tmp_path):
    shutil.copy(IMAGES / "a.png", tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "hi"}) + "\n")
    assert load_jsonl(tmp_path / "p.jsonl")[0].image == tmp_path / "a.png"


@pytest.mark.parametrize(
    "line, record, reason",
    [
        ("{not json", "line 1", "not valid JSON"),
        ('["a list"]', "line 1", "JSON object"),
        ('{"id": "n", "prompt": "p"}', "line 1 (id 'n')", "'image'"),
        ('{"id": "n", "image": "a.png"}', "line 1 (id 'n')", "'prompt'"),
        ('{"id": "n", "image": "a.png", "prompt": "p", "answer": 3}', "line 1 (id 'n')", "'answer'"),
        ('{"image": "a.png", "prompt": "p", "objects": ["c"], "boxes": [[0,0,1,1],[1,1,1,1]]}', "line 1",
         "2 boxes for 1"),
        ('{"image": "a.png", "prompt": "p", "objects": "cat"}', "line 1", "'objects'"),
        ('{"image": "missing.png", "prompt": "p"}', "line 1", "does not exist"),
        ('{"image": "broken.png", "prompt": "p"}', "line 1", "cannot be read"),
        ('{"id": true, "image": "a.png", "prompt": "p"}', "line 1", "'id'"),
    ],
)
def test_jsonl_each_bad_record_raises_naming_it(tmp_path, line, record, reason):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match="skip_bad") as info:
        load_jsonl(path, IMAGES)
    assert info.value.record == record and reason in info.value.reason
    assert record in str(info.value)
    assert len(load_jsonl(path, IMAGES, skip_bad=True)) == 0


def test_jsonl_bad_file_skipped_and_reported():
    data = load_jsonl(FIX / "prompts_bad.jsonl", IMAGES, skip_bad=True)
    assert data.ids == ("ok",)
    why = reasons(data)
    assert set(why) == {"line 2", "line 3", "line 4 (id 'noimage')", "line 5 (id 'noprompt')",
                        "line 6 (id 'badanswer')", "line 7 (id 'badboxes')", "line 8 (id 'missing')",
                        "line 9 (id 'broken')", "'ok'", "line 11"}
    assert why["'ok'"] == "duplicate id"
    assert data.describe()["skipped_at_load"] == 10


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_jsonl(tmp_path / "none.jsonl")


def test_unreadable_image_found_lazily_names_the_example(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "late", "image": "broken.png", "prompt": "p"}) + "\n")
    data = load_jsonl(path, IMAGES, check_images=False)
    with pytest.raises(DatasetError, match="example 'late'.*cannot be read") as info:
        data[0].load_image()
    assert info.value.record == "late"


# ---- Hugging Face datasets ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_data():
    datasets = pytest.importorskip("datasets")
    images = [PIL.Image.open(IMAGES / n).convert("RGB") for n in ("a.png", "b.png", "c.jpg")]
    return datasets.Dataset.from_dict(
        {"image": images, "question": ["q1", "q2", "q3"], "answer": ["a1", None, "a3"], "key": ["k1", "k2", "k3"],
         "objects": [["cat"], [], ["dog"]]},
        features=datasets.Features({
            "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
            "key": datasets.Value("string"), "objects": datasets.Sequence(datasets.Value("string")),
        }),
    )


def test_hf_dataset_in_memory(hf_data):
    data = load_hf_dataset(hf_data, prompt_column="question", answer_column="answer", id_column="key",
                           objects_column="objects")
    assert data.ids == ("k1", "k2", "k3")
    ex = data[1]
    assert ex.prompt == "q2" and ex.answer is None and ex.objects == ()
    assert isinstance(ex.image, PIL.Image.Image) and ex.load_image().size == (12, 12)
    assert data[0].objects == ("cat",)
    assert len(data.fingerprint()) == 16


def test_hf_dataset_from_disk_and_dict(hf_data, tmp_path):
    import datasets

    hf_data.save_to_disk(tmp_path / "flat")
    data = load_hf_dataset(tmp_path / "flat", prompt="Describe.", limit=2)
    assert data.ids == ("0", "1") and data[0].prompt == "Describe."
    datasets.DatasetDict({"test": hf_data}).save_to_disk(tmp_path / "dict")
    assert len(load_hf_dataset(tmp_path / "dict", split="test", prompt="x")) == 3
    with pytest.raises(DatasetError, match=r"split=None .*\['test'\]"):
        load_hf_dataset(tmp_path / "dict", prompt="x")


def test_hf_dataset_bad_arguments(hf_data, tmp_path):
    with pytest.raises(DatasetError, match=r"prompt_column='nope' is not a column.*question"):
        load_hf_dataset(hf_data, prompt_column="nope")
    with pytest.raises(DatasetError, match="exactly one of"):
        load_hf_dataset(hf_data)
    with pytest.raises(DatasetError, match="does not exist"):
        load_hf_dataset(tmp_path / "missing", prompt="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="save_to_disk"):
        load_hf_dataset(tmp_path / "empty", prompt="x")


def test_hf_dataset_bad_records(hf_data):
    import datasets

    bad = datasets.Dataset.from_dict({
        "image": [str(IMAGES / "a.png"), str(IMAGES / "b.png"), str(IMAGES / "c.jpg"), "x"],
        "prompt": ["p", None, "p", "p"],
        "key": ["a", "b", "a", "c"],
    })
    with pytest.raises(DatasetError, match="row 1: prompt must be"):
        load_hf_dataset(bad, prompt_column="prompt", id_column="key")
    data = load_hf_dataset(bad, prompt_column="prompt", id_column="key", skip_bad=True)
    assert data.ids == ("a", "c")
    assert reasons(data) == {"row 1": "prompt must be a non-empty string, got None", "row 2": "duplicate id 'a'"}
    assert data[0].image == IMAGES / "a.png"
    with pytest.raises(DatasetError, match="'x' does not exist") as info:  # a path to nowhere, found when read
        data[1].load_image()
    assert info.value.record == "c"
    numbers = datasets.Dataset.from_dict({"image": [7], "prompt": ["p"]})
    with pytest.raises(DatasetError, match="example '0'.*holds int, not an image"):
        load_hf_dataset(numbers, prompt_column="prompt")[0]


# ---- scenes and ExampleSet ----------------------------------------------------------


def test_scenes_loader_labels():
    data = load_scenes(4, seed=1)
    assert len(data) == 4 and data.kind == "scenes"
    ex = data[0]
    assert ex.id.startswith("scene-") and ex.prompt == "describe the image ." and ex.answer.endswith(" .")
    assert ex.objects and all(o in ("circle", "square", "triangle", "cross", "diamond") for o in ex.objects)
    assert len(ex.boxes) == len(ex.objects)
    for x, y, w, h in ex.boxes:
        assert 0 <= x < 64 and 0 <= y < 64 and w > 0 and h > 0 and x % 8 == 0
    qa = load_scenes(2, question="count")[0]
    assert qa.prompt == "how many objects are there ?" and qa.answer in ("one", "two", "three")
    with pytest.raises(DatasetError, match="question must be"):
        load_scenes(2, question="size")
    assert load_scenes(3).fingerprint() == load_scenes(3).fingerprint() != load_scenes(3, seed=2).fingerprint()


def test_example_set_from_examples_rejects_duplicates():
    img = PIL.Image.new("RGB", (4, 4))
    with pytest.raises(DatasetError, match="duplicate example id 'a'"):
        ExampleSet.from_examples([Example("a", img, "p"), Example("a", img, "q")])
    data = ExampleSet.from_examples([Example("a", img, "p")], skipped=[Skipped("b", "why")])
    assert data.describe()["size"] == 1 and data.describe()["skipped_at_load"] == 1 and data[-1].id == "a"


def test_hf_undecodable_image_names_the_example():
    datasets = pytest.importorskip("datasets")
    broken = (IMAGES / "broken.png").read_bytes()
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": broken, "path": None}], "prompt": ["p"]},
        features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    with pytest.raises(DatasetError, match="example '0': row 0: the image does not decode") as info:
        load_hf_dataset(data, prompt_column="prompt")[0]
    assert info.value.record == "0"
