"""Data sources for vlens: synthetic scenes with known ground truth."""

from vlens.data.scenes import (
    CAPTION_QUESTION,
    CELLS,
    COLOURS,
    QA,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    VOCABULARY,
    Scene,
    SceneDataset,
    SceneObject,
    caption_split,
    every_question,
    generate_scene,
    make_scenes,
)

__all__ = [
    "CAPTION_QUESTION",
    "CELLS",
    "COLOURS",
    "QA",
    "QUESTION_KINDS",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "Scene",
    "SceneDataset",
    "SceneObject",
    "caption_split",
    "every_question",
    "generate_scene",
    "make_scenes",
]

from vlens.data.loaders import (  # noqa: E402  (issue #7: data-set loaders)
    Example,
    ExampleSet,
    Skipped,
    load_coco_captions,
    load_hf_dataset,
    load_jsonl,
    load_scenes,
)

__all__ += [
    "Example",
    "ExampleSet",
    "Skipped",
    "load_coco_captions",
    "load_hf_dataset",
    "load_jsonl",
    "load_scenes",
]
