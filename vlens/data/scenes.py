"""Deterministic synthetic scenes with per-pixel ground truth.

A scene is a small RGB image (64x64 by default) holding 1-3 flat-coloured shapes, each centred in
its own cell of a 3x3 layout, on a noisy textured grey background. Because every object is drawn
from an analytic mask, the generator knows for every pixel which object (if any) covers it, and so
for every patch of a vision transformer's grid. Each scene also carries its canonical caption and
one question/answer pair per question type (two for the yes/no type: one "yes", one "no", so that
yes/no answers are balanced 50/50 by construction).

All text is lowercase, with words and punctuation separated by single spaces, so a whitespace
word-level tokenizer covers it exactly (see `VOCABULARY`).

Example:
    >>> scene = generate_scene(7)
    >>> scene.caption  # doctest: +SKIP
    'a small red circle at top left and a big blue square at center .'
    >>> scene.patch_labels.shape
    (8, 8)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Bool, Int
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "orange": (245, 135, 30),
}
SIZES: dict[str, float] = {"small": 7.0, "big": 10.0}  # half-extent in pixels at 64x64
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
CELLS: tuple[str, ...] = tuple(
    "center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS
)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "where", "count", "present")
CAPTION_QUESTION = "describe the image ."

# Every word the generator can emit (captions, questions, answers, text-only descriptions).
_FIXED_WORDS = (
    "a at and . ? what colour is the object shape where how many objects are there "
    "yes no describe image"
)
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        _FIXED_WORDS.split()
        + list(SHAPES)
        + list(COLOURS)
        + list(SIZES)
        + [w for cell in CELLS for w in cell.split()]
        + list(COUNT_WORDS)
    )
)

Split = Literal["train", "heldout"]
HELDOUT_FRACTION_DENOMINATOR = 10  # one caption in ten is held out
PATCH_COVER_THRESHOLD = 0.25  # fraction of a patch's pixels an object must cover to own it


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: One of `SHAPES`.
        colour: One of the keys of `COLOURS`.
        size: ``"small"`` or ``"big"``.
        cell: Index 0-8 of its cell in the 3x3 layout, raster order (0 = top left).
    """

    shape: str
    colour: str
    size: str
    cell: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        if not isinstance(self.cell, int) or not 0 <= self.cell < 9:
            raise ValueError(f"cell must be an int in 0..8, got {self.cell!r}")

    @property
    def place(self) -> str:
        """The cell's name, e.g. ``"top left"`` or ``"center"``."""
        return CELLS[self.cell]

    @property
    def phrase(self) -> str:
        """``"a small red circle at top left"``."""
        return f"a {self.size} {self.colour} {self.shape} at {self.place}"


@dataclass(frozen=True)
class QA:
    """A question about a scene and its single exact answer.

    Attributes:
        kind: One of `QUESTION_KINDS`.
        question: Lowercase, space-separated, ending in ``" ?"``.
        answer: One or two words (``"top left"``), no final punctuation.
    """

    kind: str
    question: str
    answer: str


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene with its ground truth.

    Attributes:
        seed: The integer seed that reproduces the scene with `generate_scene`.
        image: RGB image of ``image_size`` x ``image_size`` pixels.
        objects: The objects, in raster order of their cells.
        patch_labels: For each patch of the ``patch_size`` grid, the index into `objects` of the
            object covering most of its pixels (at least `PATCH_COVER_THRESHOLD` of them), or -1.
        caption: Canonical caption, objects in raster order, e.g.
            ``"a small red circle at top left and a big blue square at center ."``.
        questions: One QA per kind in `QUESTION_KINDS`, plus a second "present" QA, so that the
            scene has exactly one "yes" and one "no" presence question.
    """

    seed: int
    image: Image.Image
    objects: tuple[SceneObject, ...]
    patch_labels: Int[np.ndarray, "rows cols"]
    caption: str
    questions: tuple[QA, ...]

    @property
    def split(self) -> Split:
        """Which split the caption hashes to (see `caption_split`)."""
        return caption_split(self.caption)


def caption_split(caption: str) -> Split:
    """Assigns a caption to a split by hashing it, so held-out captions never occur in training."""
    digest = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "big")
    return "heldout" if digest % HELDOUT_FRACTION_DENOMINATOR == 0 else "train"


def object_mask(
    obj: SceneObject, center: tuple[float, float], image_size: int
) -> Bool[np.ndarray, "h w"]:
    """Pixels covered by an object drawn at ``center`` (x, y), from its analytic shape.

    Sizes are defined at 64 px and scale with ``image_size``.
    """
    r = SIZES[obj.size] * image_size / 64.0
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5  # pixel centres
    dx, dy = xs - center[0], ys - center[1]
    ax, ay = np.abs(dx), np.abs(dy)
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return np.maximum(ax, ay) <= 0.82 * r
    if obj.shape == "diamond":
        return ax + ay <= r
    if obj.shape == "triangle":  # apex up, base as wide as the object is tall
        return (dy >= -r) & (dy <= r) & (ax <= (dy + r) / 2)
    if obj.shape == "cross":
        arm = 0.38 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {obj.shape!r}")  # unreachable: SceneObject validates


def patch_labels_from_masks(
    masks: list[Bool[np.ndarray, "h w"]], patch_size: int
) -> Int[np.ndarray, "rows cols"]:
    """Owner of each patch: the object covering most of its pixels, if at least the threshold."""
    h, w = masks[0].shape if masks else (0, 0)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={patch_size}")
    rows, cols = h // patch_size, w // patch_size
    if not masks:
        return np.full((rows, cols), -1, dtype=np.int64)
    cover = np.stack(
        [m.reshape(rows, patch_size, cols, patch_size).sum(axis=(1, 3)) for m in masks]
    )  # [obj, rows, cols]
    best = cover.argmax(axis=0)
    owned = cover.max(axis=0) >= PATCH_COVER_THRESHOLD * patch_size * patch_size
    return np.where(owned, best, -1).astype(np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured grey: a random base level, a smooth low-frequency field, stripes and pixel noise."""
    base = rng.uniform(80, 160)
    coarse = rng.normal(0, 14, size=(4, 4))
    field = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1)))[:size, :size]
    ys, xs = np.mgrid[0:size, 0:size]
    period, angle = rng.uniform(6, 16), rng.uniform(0, np.pi)
    stripes = 8 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    grey = base + field + stripes + rng.normal(0, 6, size=(size, size))
    tint = rng.uniform(-8, 8, size=3)  # slight colour cast, far from the object colours
    return grey[..., None] + tint


def _render(
    rng: np.random.Generator, objects: tuple[SceneObject, ...], image_size: int
) -> tuple[Image.Image, list[np.ndarray]]:
    pixels = _background(rng, image_size)
    cell = image_size / 3
    masks = []
    for obj in objects:
        row, col = divmod(obj.cell, 3)
        # Sub-pixel jitter only: big objects (half-extent 10 px) must stay inside their 21.3 px
        # cell, and a near-fixed placement keeps per-patch shape recognition learnable by a
        # small vision tower in minutes of CPU time.
        jitter = rng.uniform(-0.5, 0.5, size=2) * image_size / 64
        center = ((col + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1])
        mask = object_mask(obj, center, image_size)
        colour = np.array(COLOURS[obj.colour], dtype=np.float64) + rng.uniform(-15, 15, size=3)
        noise = rng.normal(0, 8, size=(image_size, image_size, 3))
        pixels = np.where(mask[..., None], colour + noise, pixels)
        masks.append(mask)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")
    return image, masks


def _sample_objects(rng: np.random.Generator, n_objects: int) -> tuple[SceneObject, ...]:
    cells = sorted(rng.choice(9, size=n_objects, replace=False).tolist())
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        while True:  # distinct (colour, shape) pairs keep "where is the red circle" unambiguous
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        size = tuple(SIZES)[rng.integers(len(SIZES))]
        objects.append(SceneObject(shape=shape, colour=colour, size=size, cell=int(cell)))
    return tuple(objects)


def make_caption(objects: tuple[SceneObject, ...]) -> str:
    """Canonical caption: object phrases in the given order joined by "and", then " ."."""
    return " and ".join(o.phrase for o in objects) + " ."


def _lookup_questions(target: SceneObject, objects: tuple[SceneObject, ...]) -> tuple[QA, QA, QA]:
    """The colour, shape-at-place and where questions about one object of a scene."""
    if [o.shape for o in objects].count(target.shape) == 1:
        colour_q = f"what colour is the {target.shape} ?"
    else:  # the shape does not name one object; its cell does
        colour_q = f"what colour is the object at {target.place} ?"
    return (
        QA("colour", colour_q, target.colour),
        QA("shape", f"what shape is at {target.place} ?", target.shape),
        QA("where", f"where is the {target.colour} {target.shape} ?", target.place),
    )


def every_question(scene: Scene) -> tuple[QA, ...]:
    """Every question the generator can ask about ``scene``: the colour, shape-at-place and
    where questions of each of its objects, the count question and the scene's two presence
    questions (one "yes", one "no"). `Scene.questions` is one draw from these."""
    lookups = [qa for obj in scene.objects for qa in _lookup_questions(obj, scene.objects)]
    rest = [qa for qa in scene.questions if qa.kind in ("count", "present")]
    return tuple(lookups + rest)


def _questions(rng: np.random.Generator, objects: tuple[SceneObject, ...]) -> tuple[QA, ...]:
    target = objects[rng.integers(len(objects))]
    colour_qa = _lookup_questions(target, objects)[0]
    shape_obj = objects[rng.integers(len(objects))]
    where_obj = objects[rng.integers(len(objects))]
    present_obj = objects[rng.integers(len(objects))]
    # "no" questions: half are near misses (a present colour with another shape or vice versa).
    present = {(o.colour, o.shape) for o in objects}
    while True:
        if rng.random() < 0.5:
            base = objects[rng.integers(len(objects))]
            if rng.random() < 0.5:
                pair = (base.colour, SHAPES[rng.integers(len(SHAPES))])
            else:
                pair = (tuple(COLOURS)[rng.integers(len(COLOURS))], base.shape)
        else:
            pair = (tuple(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])
        if pair not in present:
            break
    return (
        colour_qa,
        _lookup_questions(shape_obj, objects)[1],
        _lookup_questions(where_obj, objects)[2],
        QA("count", "how many objects are there ?", COUNT_WORDS[len(objects) - 1]),
        QA("present", f"is there a {present_obj.colour} {present_obj.shape} ?", "yes"),
        QA("present", f"is there a {pair[0]} {pair[1]} ?", "no"),
    )


def generate_scene(
    seed: int, *, image_size: int = 64, patch_size: int = 8, n_objects: int | None = None
) -> Scene:
    """Generates one scene; the same arguments always give the same scene.

    Args:
        seed: Non-negative integer seed.
        image_size: Side of the square image in pixels; a multiple of ``patch_size``.
        patch_size: Side of a vision-transformer patch, for `Scene.patch_labels`.
        n_objects: 1, 2 or 3; drawn uniformly from these when None.

    Returns:
        The scene.

    Raises:
        TypeError: If ``seed`` is not an int.
        ValueError: On a negative seed, bad sizes or a bad object count.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    if n_objects is not None and n_objects not in (1, 2, 3):
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects!r}")
    rng = np.random.default_rng(int(seed))
    count = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objects = _sample_objects(rng, count)
    image, masks = _render(rng, objects, image_size)
    return Scene(
        seed=int(seed),
        image=image,
        objects=objects,
        patch_labels=patch_labels_from_masks(masks, patch_size),
        caption=make_caption(objects),
        questions=_questions(rng, objects),
    )


def make_scenes(
    n: int, seed: int = 0, split: Split = "train", *, image_size: int = 64, patch_size: int = 8
) -> list[Scene]:
    """The first ``n`` scenes of a seeded stream whose captions fall in ``split``.

    Scene ``i`` of the stream uses seed ``seed * 1_000_003 + i``, so different stream seeds give
    (practically) disjoint scenes; the split depends only on the caption, so no held-out caption
    ever appears in any training stream.

    Args:
        n: Number of scenes wanted.
        seed: Stream seed (non-negative int).
        split: ``"train"`` or ``"heldout"``.
        image_size: See `generate_scene`.
        patch_size: See `generate_scene`.

    Returns:
        ``n`` scenes, in stream order.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    scenes: list[Scene] = []
    i = 0
    while len(scenes) < n:
        scene = generate_scene(seed * 1_000_003 + i, image_size=image_size, patch_size=patch_size)
        if scene.split == split:
            scenes.append(scene)
        i += 1
    return scenes


class SceneDataset:
    """An indexable list of the first ``n`` scenes of one split (see `make_scenes`).

    Scenes are generated once, at construction.
    """

    def __init__(
        self, n: int, seed: int = 0, split: Split = "train", *, image_size: int = 64,
        patch_size: int = 8,
    ) -> None:
        self._scenes = make_scenes(n, seed, split, image_size=image_size, patch_size=patch_size)

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int) -> Scene:
        return self._scenes[index]
