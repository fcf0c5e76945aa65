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
    "generate_scene",
    "make_scenes",
]
