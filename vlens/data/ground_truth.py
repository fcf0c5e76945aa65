"""A scene's ground truth per visual token: which object's patch each image token shows.

The scene generator knows which object covers each patch of the grid it was drawn for
(``Scene.patch_labels``); an image span knows each token's row and column on its grid. Both
the CLI and the report label the logit lens's image tokens from these, so the rule lives here
once.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np

from vlens.data.scenes import PATCH_COVER_THRESHOLD, Scene

Attribute = Literal["colour", "shape"]
ATTRIBUTES: tuple[Attribute, ...] = ("colour", "shape")


def token_objects(scene: Scene, span: Any) -> Optional[np.ndarray]:
    """Per token of ``span``, the index into ``scene.objects`` of the object covering its patch
    (-1: background, or a token off the grid such as a row-end separator).

    Returns None when the span has no grid (learned query tokens) or a grid other than the
    one the scene was drawn for (its labels then say nothing about these tokens).
    """
    if span.grid is None or tuple(span.grid) != tuple(scene.patch_labels.shape):
        return None
    owners = np.full(span.n_tokens, -1, dtype=np.int64)
    on = span.on_grid.numpy().astype(bool)
    rc = span.row_col.numpy()
    owners[on] = scene.patch_labels[rc[on, 0], rc[on, 1]]
    return owners


def token_words(scene: Scene, span: Any, attribute: Attribute = "colour") -> Optional[list[Optional[str]]]:
    """Per token of ``span``, the ``attribute`` word (``"red"``, ``"circle"``) of the object whose
    patch it shows, None for background tokens; None when the scene cannot label this span
    (see :func:`token_objects`)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    owners = token_objects(scene, span)
    if owners is None:
        return None
    return [getattr(scene.objects[int(o)], attribute) if o >= 0 else None for o in owners.tolist()]


def describe_labels(attribute: str, n_labelled: int, n_tokens: int) -> str:
    """The sentence that says which labels a lens match rate used."""
    return (
        f"the scene's per-patch ground truth: each image token whose patch an object covers (at least "
        f"{PATCH_COVER_THRESHOLD:.0%} of its pixels) is labelled with that object's {attribute} word; "
        f"{n_labelled} of {n_tokens} image tokens are labelled, background tokens are not"
    )
