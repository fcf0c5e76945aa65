"""Data-set loaders: COCO captions, an image folder with a JSONL of prompts, Hugging Face
``datasets`` image data sets, and the synthetic scenes, all as one :class:`ExampleSet`.

Every loader yields :class:`Example` s (an id, an image, a prompt, an optional answer and
optional labels: object words and their boxes). A record that cannot be used (a missing
image file, an image that does not open, a malformed record, a duplicate id) raises
:class:`~vlens.errors.DatasetError` naming the record; with ``skip_bad=True`` it is left
out and listed in :attr:`ExampleSet.skipped` with its reason instead. Nothing is dropped
silently. Images are read lazily: an example holds its path and opens it on
:meth:`Example.load_image`, so a problem only visible when decoding (a truncated file)
surfaces there, again as a ``DatasetError`` naming the record (a sweep reports it the same
way).

Example:
    >>> data = load_jsonl("prompts.jsonl", images="images/", skip_bad=True)  # doctest: +SKIP
    >>> len(data), data.skipped[:1]  # doctest: +SKIP
    (998, (Skipped(id='line 17', reason="image file 'images/x.png' does not exist"),))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union, cast

import PIL.Image

from vlens.errors import DatasetError

if TYPE_CHECKING:
    from vlens.data.scenes import Split

Box = tuple[float, float, float, float]  # x, y, width, height in the image's pixels
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Example:
    """One image + prompt (+ answer) with optional labels.

    Attributes:
        id: Unique within its data set.
        image: The image, or the path it is read from (lazily, by :meth:`load_image`).
        prompt: The user's text, without chat template.
        answer: What the model should say, or None.
        objects: Object words in the image (e.g. COCO category names), possibly empty.
        boxes: One ``(x, y, w, h)`` pixel box per object when known, else empty.
    """

    id: str
    image: Union[PIL.Image.Image, Path]
    prompt: str
    answer: Optional[str] = None
    objects: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()

    def load_image(self) -> PIL.Image.Image:
        """The image as RGB; raises ``DatasetError`` naming this example if it cannot be read."""
        if isinstance(self.image, PIL.Image.Image):
            return self.image.convert("RGB")
        try:
            with PIL.Image.open(self.image) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"example {self.id!r}: image file '{self.image}' does not exist", self.id,
                               f"image file '{self.image}' does not exist") from None
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
            reason = f"image file '{self.image}' cannot be read: {exc}"
            raise DatasetError(f"example {self.id!r}: {reason}", self.id, reason) from exc


@dataclass(frozen=True)
class Skipped:
    """A record left out with ``skip_bad=True``, and why."""

    id: str
    reason: str


class ExampleSet(Sequence):
    """The examples of a data set, in a fixed order, with the records that were skipped.

    Examples are built on access (``data[i]``), so a large Hugging Face data set is not
    decoded up front. ``ids`` lists every example id without touching an image.
    """

    def __init__(
        self,
        ids: Sequence[str],
        get: Callable[[int], Example],
        *,
        kind: str,
        source: dict[str, Any],
        skipped: Sequence[Skipped] = (),
        fingerprint: Optional[str] = None,
    ) -> None:
        self._ids = tuple(ids)
        self._get = get
        self.kind = kind
        self.source = dict(source)
        self.skipped = tuple(skipped)
        self._fingerprint = fingerprint

    @classmethod
    def from_examples(cls, examples: Sequence[Example], *, kind: str = "examples", source: Optional[dict] = None,
                      skipped: Sequence[Skipped] = ()) -> "ExampleSet":
        """Wrap a list of examples (ids must be unique)."""
        examples = tuple(examples)
        seen: set[str] = set()
        for ex in examples:
            if not isinstance(ex, Example):
                raise DatasetError(f"expected Example objects, got {type(ex).__name__}: {ex!r}")
            if ex.id in seen:
                raise DatasetError(f"duplicate example id {ex.id!r}", ex.id, "duplicate id")
            seen.add(ex.id)
        return cls([e.id for e in examples], examples.__getitem__, kind=kind, source=source or {}, skipped=skipped)

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Example:
        if isinstance(index, slice):
            raise TypeError("ExampleSet does not slice; use .select(indices)")
        return self._get(range(len(self))[index])

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def fingerprint(self) -> str:
        """A hash of what identifies the data: ids, prompts, answers, labels and image sources
        (paths for files; for in-memory images their pixels; a Hugging Face data set's own
        fingerprint when it has one)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for ex in self:
                image = ex.image
                src = str(image) if isinstance(image, Path) else hashlib.sha256(image.tobytes()).hexdigest()
                h.update(json.dumps([ex.id, ex.prompt, ex.answer, ex.objects, ex.boxes, src]).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What a sweep records about its data: kind, source, size, fingerprint, skipped count."""
        return {"kind": self.kind, "source": self.source, "size": len(self), "fingerprint": self.fingerprint(),
                "skipped_at_load": len(self.skipped)}

    def __repr__(self) -> str:
        return f"ExampleSet(kind={self.kind!r}, size={len(self)}, skipped={len(self.skipped)})"


class _Collector:
    """Raise on a bad record, or keep it in the skipped list when ``skip_bad``."""

    def __init__(self, skip_bad: bool, what: str) -> None:
        self.skip_bad = skip_bad
        self.what = what
        self.skipped: list[Skipped] = []

    def bad(self, record: str, reason: str) -> None:
        if not self.skip_bad:
            raise DatasetError(f"{self.what}: record {record}: {reason} (pass skip_bad=True to skip and report bad "
                               "records)", record, reason)
        self.skipped.append(Skipped(record, reason))


def _check_image(path: Path, check_images: bool) -> Optional[str]:
    """Why the image at ``path`` is unusable, or None."""
    if not path.is_file():
        return f"image file '{path}' does not exist"
    if check_images:
        try:
            with PIL.Image.open(path) as img:
                img.verify()
        except Exception as exc:  # PIL raises many types for corrupt files
            return f"image file '{path}' cannot be read: {exc}"
    return None


def _finish(examples: list[Example], col: _Collector, kind: str, source: dict, limit: Optional[int]) -> ExampleSet:
    seen: set[str] = set()
    unique = []
    for ex in examples:
        if ex.id in seen:
            col.bad(repr(ex.id), "duplicate id")
            continue
        seen.add(ex.id)
        unique.append(ex)
    if limit is not None:
        unique = unique[:limit]
    return ExampleSet.from_examples(unique, kind=kind, source=source, skipped=col.skipped)


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise DatasetError(f"limit must be a non-negative int or None, got {limit!r}")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} file '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{what} file '{path}' is not valid JSON: {exc}") from exc


def _check_dir(path: PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"{what} folder '{folder}' does not exist or is not a folder")
    return folder


def _labels(objects: Any, boxes: Any) -> tuple[tuple[str, ...], tuple[Box, ...]]:
    """Validated object words and boxes; raises ValueError with the reason."""
    objects = () if objects is None else objects
    boxes = () if boxes is None else boxes
    if not isinstance(objects, (list, tuple)) or not all(isinstance(o, str) and o for o in objects):
        raise ValueError(f"'objects' must be a list of non-empty strings, got {objects!r}")
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"'boxes' must be a list of [x, y, w, h], got {boxes!r}")
    out = []
    for b in boxes:
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) or b[2] < 0 or b[3] < 0):
            raise ValueError(f"each box must be [x, y, w, h] with w, h >= 0, got {b!r}")
        out.append(tuple(float(v) for v in b))
    if out and len(out) != len(objects):
        raise ValueError(f"{len(out)} boxes for {len(objects)} objects; give one box per object or none")
    return tuple(objects), tuple(out)


# ---- COCO captions ------------------------------------------------------------------


def load_coco_captions(
    annotations: PathLike,
    images: PathLike,
    *,
    prompt: str = "Describe the image.",
    answer: str = "first",
    instances: Optional[PathLike] = None,
    skip_bad: bool = False,
    check_images: bool = True,
    limit: Optional[int] = None,
) -> ExampleSet:
    """One example per image of a COCO-captions annotation file.

    Args:
        annotations: ``captions_*.json``: ``images`` (``id``, ``file_name``) and
            ``annotations`` (``image_id``, ``caption``). If it also holds ``categories``
            and annotations with ``bbox`` + ``category_id``, those become labels.
        images: The folder the ``file_name`` s are relative to.
        prompt: The prompt of every example.
        answer: ``"first"``: the image's first caption (by annotation id) is the answer;
            ``"none"``: no answer.
        instances: Optional ``instances_*.json`` giving object words and boxes.
        skip_bad: Skip and report bad records instead of raising.
        check_images: Open every image once at load time (catches unreadable files early).
        limit: Keep the first ``limit`` examples (in image-id order).
    """
    if answer not in ("first", "none"):
        raise DatasetError(f"answer must be 'first' or 'none', got {answer!r}")
    _check_limit(limit)
    ann_path, folder = Path(annotations), _check_dir(images, "COCO image")
    data = _read_json(ann_path, "COCO annotation")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DatasetError(f"COCO annotation file '{ann_path}' must be an object with 'images' and 'annotations' lists")
    col = _Collector(skip_bad, f"COCO file '{ann_path}'")
    files: dict[Any, str] = {}
    for i, rec in enumerate(data["images"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), (int, str)) or not isinstance(
                rec.get("file_name"), str):
            col.bad(f"images[{i}]", f"an image record needs an int/str 'id' and a str 'file_name', got {rec!r}")
            continue
        if rec["id"] in files:
            col.bad(f"image {rec['id']!r}", "duplicate id")
            continue
        files[rec["id"]] = rec["file_name"]
    captions: dict[Any, list[tuple[Any, str]]] = {}
    labelled: dict[Any, list[tuple[str, Box]]] = {}
    categories = {c.get("id"): c.get("name") for c in data.get("categories", []) if isinstance(c, dict)}
    extra = _read_json(Path(instances), "COCO instances") if instances is not None else None
    if extra is not None:
        if not isinstance(extra, dict) or not isinstance(extra.get("annotations"), list):
            raise DatasetError(f"COCO instances file '{instances}' must be an object with an 'annotations' list")
        categories.update({c.get("id"): c.get("name") for c in extra.get("categories", []) if isinstance(c, dict)})
    pools = [("annotations", data["annotations"])] + ([("instances", extra["annotations"])] if extra else [])
    for pool, anns in pools:
        for i, ann in enumerate(anns):
            where = f"{pool}[{i}]" + (f" (id {ann.get('id')!r})" if isinstance(ann, dict) and "id" in ann else "")
            if not isinstance(ann, dict) or "image_id" not in ann:
                col.bad(where, f"an annotation needs an 'image_id', got {ann!r}")
                continue
            if ann["image_id"] not in files:
                col.bad(where, f"refers to image {ann['image_id']!r}, which is not in 'images'")
                continue
            if "caption" in ann:
                if not isinstance(ann["caption"], str) or not ann["caption"].strip():
                    col.bad(where, f"caption must be a non-empty string, got {ann['caption']!r}")
                    continue
                captions.setdefault(ann["image_id"], []).append((ann.get("id", i), ann["caption"].strip()))
            elif "bbox" in ann:
                name = categories.get(ann.get("category_id"))
                try:
                    _, (box,) = _labels([name or "?"], [ann["bbox"]])
                except ValueError as exc:
                    col.bad(where, str(exc))
                    continue
                if not name:
                    col.bad(where, f"category_id {ann.get('category_id')!r} is not in 'categories'")
                    continue
                labelled.setdefault(ann["image_id"], []).append((name, box))
            else:
                col.bad(where, "an annotation needs a 'caption' or a 'bbox'")
    examples = []
    for image_id in sorted(files, key=lambda k: (isinstance(k, str), k)):
        path = folder / files[image_id]
        problem = _check_image(path, check_images)
        if problem:
            col.bad(f"image {image_id!r}", problem)
            continue
        caps = sorted(captions.get(image_id, []), key=lambda c: (str(type(c[0])), c[0]))
        labels = labelled.get(image_id, [])
        examples.append(Example(
            id=str(image_id), image=path, prompt=prompt,
            answer=caps[0][1] if (answer == "first" and caps) else None,
            objects=tuple(n for n, _ in labels), boxes=tuple(b for _, b in labels),
        ))
    source = {"annotations": str(ann_path), "images": str(folder), "prompt": prompt, "answer": answer,
              "instances": None if instances is None else str(instances), "limit": limit}
    return _finish(examples, col, "coco_captions", source, limit)


# ---- image folder + JSONL -----------------------------------------------------------


def load_jsonl(
    records: PathLike,
    images: Optional[PathLike] = None,
    *,
    prompt: Optional[str] = None,
    skip_bad: bool = False,
    check_images: bool = True,
    limit: Optional[int] = None,
) -> ExampleSet:
    """Examples from a JSONL file, one JSON object a line, and a folder of images.

    Each record: ``"image"`` (path relative to ``images``), ``"prompt"`` (may be left out
    when ``prompt`` gives a default), and optionally ``"id"`` (default ``"line N"``,
    1-based), ``"answer"``, ``"objects"`` (list of words) and ``"boxes"`` (one
    ``[x, y, w, h]`` per object). Blank lines are ignored.

    Args:
        records: The JSONL file.
        images: The image folder (default: the JSONL file's folder).
        prompt: Default prompt for records without one.
        skip_bad: Skip and report bad records instead of raising.
        check_images: Open every image once at load time.
        limit: Keep the first ``limit`` examples.
    """
    _check_limit(limit)
    path = Path(records)
    if not path.is_file():
        raise DatasetError(f"JSONL file '{path}' does not exist")
    folder = _check_dir(images if images is not None else path.parent, "image")
    col = _Collector(skip_bad, f"JSONL file '{path}'")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            col.bad(where, f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            col.bad(where, f"expected a JSON object, got {type(rec).__name__}")
            continue
        rid = rec.get("id", where)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            col.bad(where, f"'id' must be a string or an int, got {rid!r}")
            continue
        rid = str(rid)
        if rid != where:
            where = f"{where} (id {rid!r})"
        text = rec.get("prompt", prompt)
        ans = rec.get("answer")
        if not isinstance(rec.get("image"), str) or not rec["image"]:
            col.bad(where, f"'image' must be a non-empty path string, got {rec.get('image')!r}")
            continue
        if not isinstance(text, str) or not text.strip():
            col.bad(where, f"'prompt' must be a non-empty string, got {text!r}")
            continue
        if ans is not None and not isinstance(ans, str):
            col.bad(where, f"'answer' must be a string or absent, got {ans!r}")
            continue
        try:
            objects, boxes = _labels(rec.get("objects"), rec.get("boxes"))
        except ValueError as exc:
            col.bad(where, str(exc))
            continue
        image_path = folder / rec["image"]
        problem = _check_image(image_path, check_images)
        if problem:
            col.bad(where, problem)
            continue
        examples.append(Example(rid, image_path, text, ans, objects, boxes))
    source = {"records": str(path), "images": str(folder), "prompt": prompt, "limit": limit}
    return _finish(examples, col, "jsonl", source, limit)


# ---- Hugging Face datasets ----------------------------------------------------------


def load_hf_dataset(
    source: Any,
    *,
    split: Optional[str] = None,
    image_column: str = "image",
    prompt_column: Optional[str] = None,
    prompt: Optional[str] = None,
    answer_column: Optional[str] = None,
    id_column: Optional[str] = None,
    objects_column: Optional[str] = None,
    boxes_column: Optional[str] = None,
    skip_bad: bool = False,
    limit: Optional[int] = None,
) -> ExampleSet:
    """Examples from a Hugging Face ``datasets`` image data set (never downloads).

    Args:
        source: A ``datasets.Dataset``, a ``DatasetDict`` (with ``split``), or a local
            folder written by ``save_to_disk``.
        split: Which split of a ``DatasetDict``.
        image_column: Column of images (``Image`` feature, PIL images or paths).
        prompt_column: Column of prompts; or give one ``prompt`` for every example.
        prompt: The prompt of every example when there is no prompt column.
        answer_column: Optional column of answers.
        id_column: Optional column of ids (default: the row index).
        objects_column: Optional column of object words.
        boxes_column: Optional column of object boxes.
        skip_bad: Skip and report records with a missing prompt/id, a bad answer or
            labels, or a duplicate id (checked at load time; an image that fails to
            decode is reported when it is read).
        limit: Keep the first ``limit`` examples.
    """
    import datasets  # lazy: only this loader needs it

    _check_limit(limit)
    desc: dict[str, Any] = {"split": split}
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise DatasetError(f"Hugging Face data set folder '{source}' does not exist")
        desc["path"] = str(source)
        try:
            source = datasets.load_from_disk(os.fspath(source))
        except Exception as exc:
            raise DatasetError(f"'{desc['path']}' is not a data set saved with save_to_disk: {exc}") from exc
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DatasetError(f"split={split!r} is not in this DatasetDict; it has {sorted(source)}")
        source = source[split]
    if not isinstance(source, datasets.Dataset):
        raise DatasetError(f"expected a datasets.Dataset, DatasetDict or a save_to_disk folder, got "
                           f"{type(source).__name__}")
    if (prompt_column is None) == (prompt is None):
        raise DatasetError("give exactly one of prompt_column= (a column of prompts) or prompt= (one prompt for all)")
    columns = {"image_column": image_column, "prompt_column": prompt_column, "answer_column": answer_column,
               "id_column": id_column, "objects_column": objects_column, "boxes_column": boxes_column}
    for arg, name in columns.items():
        if name is not None and name not in source.column_names:
            raise DatasetError(f"{arg}={name!r} is not a column of this data set; it has {source.column_names}")
    text_cols = [c for c in (prompt_column, answer_column, id_column, objects_column, boxes_column) if c]
    # Without batched=True, to_dict() gives one dict (column -> values), not an iterator of them.
    table = cast(dict[str, list], source.select_columns(text_cols).to_dict()) if text_cols else {}
    col = _Collector(skip_bad, "Hugging Face data set")
    kept: list[tuple[int, str, str, Optional[str], tuple, tuple]] = []
    for i in range(len(source)):
        where = f"row {i}"
        rid = table[id_column][i] if id_column else str(i)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            col.bad(where, f"id must be a string or an int, got {rid!r}")
            continue
        text = table[prompt_column][i] if prompt_column else prompt
        ans = table[answer_column][i] if answer_column else None
        if not isinstance(text, str) or not text.strip():
            col.bad(where, f"prompt must be a non-empty string, got {text!r}")
            continue
        if ans is not None and not isinstance(ans, str):
            col.bad(where, f"answer must be a string or None, got {ans!r}")
            continue
        try:
            objects, boxes = _labels(table[objects_column][i] if objects_column else None,
                                     table[boxes_column][i] if boxes_column else None)
        except ValueError as exc:
            col.bad(where, str(exc))
            continue
        kept.append((i, str(rid), text, ans, objects, boxes))
    ids_seen: set[str] = set()
    unique = []
    for item in kept:
        if item[1] in ids_seen:
            col.bad(f"row {item[0]}", f"duplicate id {item[1]!r}")
            continue
        ids_seen.add(item[1])
        unique.append(item)
    if limit is not None:
        unique = unique[:limit]
    images = source.select_columns([image_column])

    def get(k: int) -> Example:
        row, rid, text, ans, objects, boxes = unique[k]
        try:
            value = images[row][image_column]  # decodes an Image feature
        except Exception as exc:  # datasets/PIL raise many types for undecodable bytes
            reason = f"row {row}: the image does not decode: {type(exc).__name__}: {exc}"
            raise DatasetError(f"example {rid!r}: {reason}", rid, reason) from exc
        if isinstance(value, str):
            value = Path(value)
        if not isinstance(value, (PIL.Image.Image, Path)):
            reason = f"column {image_column!r} holds {type(value).__name__}, not an image"
            raise DatasetError(f"example {rid!r}: {reason}", rid, reason)
        return Example(rid, value, text, ans, objects, boxes)

    desc.update({k: v for k, v in columns.items() if v is not None})
    desc.update({"prompt": prompt, "limit": limit})
    fp = hashlib.sha256(json.dumps([getattr(source, "_fingerprint", None), desc, [u[:2] for u in unique]],
                                   default=str).encode()).hexdigest()[:16]
    return ExampleSet([u[1] for u in unique], get, kind="hf_dataset", source=desc, skipped=col.skipped,
                      fingerprint=fp)


# ---- synthetic scenes ---------------------------------------------------------------


def load_scenes(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    question: str = "caption",
    image_size: int = 64,
    patch_size: int = 8,
) -> ExampleSet:
    """The first ``n`` synthetic scenes of a split (see :func:`vlens.data.make_scenes`).

    Args:
        n: Number of scenes (as for ``make_scenes``).
        seed: Seed of the scene stream.
        split: ``"train"`` or ``"heldout"``.
        image_size: Side of the scenes in pixels.
        patch_size: Side of a patch, for the per-patch ground truth.
        question: ``"caption"``: prompt ``CAPTION_QUESTION``, answer the caption; or a
            question kind (``"colour"``, ``"shape"``, ``"where"``, ``"count"``,
            ``"present"``): that question (the first of its kind) and its answer.

    Labels: ``objects`` are the objects' shape words; ``boxes`` the pixel extent of the
    patches each object owns (from ``patch_labels``), left empty when an object owns none.
    """
    from vlens.data.scenes import CAPTION_QUESTION, QUESTION_KINDS, make_scenes

    if question != "caption" and question not in QUESTION_KINDS:
        raise DatasetError(f"question must be 'caption' or one of {QUESTION_KINDS}, got {question!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"n must be a non-negative int, got {n!r}")
    examples = []
    for scene in make_scenes(n, seed, split, image_size=image_size, patch_size=patch_size):
        if question == "caption":
            text, ans = CAPTION_QUESTION, scene.caption
        else:
            qa = next(q for q in scene.questions if q.kind == question)
            text, ans = qa.question, qa.answer
        boxes = []
        for k in range(len(scene.objects)):
            rows, cols = (scene.patch_labels == k).nonzero()
            if len(rows):
                boxes.append((float(cols.min() * patch_size), float(rows.min() * patch_size),
                              float((cols.max() - cols.min() + 1) * patch_size),
                              float((rows.max() - rows.min() + 1) * patch_size)))
        objects = tuple(o.shape for o in scene.objects)
        boxes_t = tuple(boxes) if len(boxes) == len(objects) else ()  # all or none (see Example.boxes)
        examples.append(Example(f"scene-{scene.seed}", scene.image, text, ans, objects, boxes_t))
    source = {"n": n, "seed": seed, "split": split, "question": question, "image_size": image_size,
              "patch_size": patch_size}
    return ExampleSet.from_examples(examples, kind="scenes", source=source)
