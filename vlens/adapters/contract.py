"""The family contract: the facts an adapter states so that no code outside it names a family.

Beyond its Hugging Face class, TransformerLens architecture, placeholder, template and
``image_spans``, every adapter states (``VisionPrefixAdapter`` raises
:class:`~vlens.errors.UnstatedFactError` for each fact a family leaves out, never assuming
a default):

``positions_after_removal`` / ``text_positions`` / ``positions_source`` / ``read_positions``
    The position ids of its language model: those of a sequence with some positions removed
    (1-D ``[n]``, or ``[axes, n]`` for multi-axis rotary models), of a text-only sequence, and
    where a forward pass shows the ones the model computed itself. The 1-D families opt into
    :class:`SequentialPositions`.
``per_token_inputs``
    The inputs its language model reads one value per token (a class attribute), e.g. token
    types that let an image's tokens attend to each other. Token-removal analyses keep the
    entries of the kept positions.
``causal_over_image``
    Whether a position's language-model state depends only on earlier positions, image
    included (the condition of the token-removal ``kv`` engine).
``token_boxes``
    The pixel box of each visual token on the input image.
``scene_geometry``
    The size at which synthetic scenes are drawn so that their label grid is the token grid.

Code elsewhere reads these through the adapter (``model.adapter``), never by testing which
family it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Optional, TypeVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vlens._modules import decoder
from vlens.errors import UnstatedFactError, UnsupportedArchitectureError

FACTS: tuple[str, ...] = (
    "positions_after_removal",
    "text_positions",
    "positions_source",
    "read_positions",
    "per_token_inputs",
    "causal_over_image",
    "token_boxes",
    "scene_geometry",
)
"""Every fact of the contract, by the adapter attribute that states it."""


def unstated(owner: Any, fact: str, what: str) -> UnstatedFactError:
    """The error for an adapter (class or instance) that does not state ``fact``."""
    cls = owner if isinstance(owner, type) else type(owner)
    family = getattr(cls, "family", cls.__name__)
    return UnstatedFactError(
        f"the {family} adapter ({cls.__name__}) does not state `{fact}`: {what}. Every family states it in its "
        "adapter (see vlens/adapters/contract.py); vlens does not assume a default"
    )


T = TypeVar("T")


class Unstated(Generic[T]):
    """The base class's value of a class-attribute fact: reading it raises ``UnstatedFactError``.

    A family states the fact by assigning the attribute on its adapter class. ``T`` is the
    type a stated fact has (``Unstated[bool](...)``), which is what reading it gives a type
    checker.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = "?"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> T:
        raise unstated(owner, self.name, self.what)


@dataclass(frozen=True)
class SceneGeometry:
    """Where synthetic scenes are drawn for a family (``vlens.data.make_scenes``).

    Attributes:
        image_size: Side in pixels of the square scene image: the processor passes it to the
            vision tower without cropping, and its ``patch_size`` cells are the token cells.
        patch_size: Side in pixels of the image region one visual token covers (a pooled or
            pixel-shuffled token covers several tower patches); for tokens without a grid
            (query tokens), the vision tower's own patch, on which their attention is drawn.
        token_grid: (rows, cols) of the whole image's token grid, None when the visual
            tokens have no grid (query tokens).
    """

    image_size: int
    patch_size: int
    token_grid: Optional[tuple[int, int]]

    def __post_init__(self) -> None:
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"scene size {self.image_size} is not a whole number of {self.patch_size} px cells")

    def scene_kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``make_scenes`` / ``generate_scene`` for this geometry."""
        return {"image_size": self.image_size, "patch_size": self.patch_size}


def no_boxes(n: int) -> Float[Tensor, "n 4"]:
    """Boxes of ``n`` tokens that cover no particular region of the image (all NaN)."""
    return torch.full((n, 4), float("nan"))


class SequentialPositions:
    """The positions fact of a language model that numbers its tokens 0, 1, 2, ...

    For these families (1-D rotary or learned position embeddings) Hugging Face's own forward
    gives a fresh sequence the positions ``0..n-1`` (``arange`` after the cache, or the
    cumulative attention mask): a sequence with some positions removed is numbered as if the
    processor had produced the shorter sequence, and a suffix starting at kept position c
    continues at c, c+1, ... . An adapter opts in by listing this class before
    ``VisionPrefixAdapter`` among its bases.
    """

    family: ClassVar[str]

    if TYPE_CHECKING:  # VisionPrefixAdapter's, which every adapter class using this mixin has

        def language_model(self, hf_model: torch.nn.Module) -> torch.nn.Module: ...

    def positions_after_removal(
        self, positions: Int[Tensor, " pos"], keep: Bool[Tensor, " pos"]
    ) -> Int[Tensor, " n"]:
        """Position ids of the sequence that keeps only the ``keep`` positions.

        Args:
            positions: The positions the model itself gave the full row (``HookedVLM.
                input_embeddings(...).position_ids[row, :length]``).
            keep: Which of the row's positions stay.

        Returns:
            The kept tokens' positions in the shorter sequence, ``0..n_kept-1``. A suffix of
            it (``[c:]``) is what the kept tokens from the c-th on get after a reused prefix.

        Raises:
            UnsupportedArchitectureError: if the model did not number the full row 0..n-1,
                so the 1-D rule does not describe it.
        """
        if positions.ndim != 1 or keep.shape != positions.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} and keep {tuple(keep.shape)} must be one row of the same length"
            )
        expected = torch.arange(positions.shape[0], device=positions.device)
        if not torch.equal(positions.to(expected.dtype), expected):
            raise UnsupportedArchitectureError(
                f"{self.family}: the language model numbered this row {positions[:8].tolist()}..., not 0..n-1, so "
                "its positions are not the 1-D sequence its adapter states"
            )
        return torch.arange(int(keep.sum()), device=positions.device)

    def text_positions(self, n: int, device: torch.device) -> Int[Tensor, " n"]:
        """Position ids of a sequence of ``n`` text tokens with nothing before them."""
        return torch.arange(n, device=device)

    def positions_source(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        """The module whose call receives the position ids the language model computed for
        itself: the first decoder layer (Hugging Face passes every layer ``position_ids``)."""
        stack = self.language_model(hf_model)
        layers = getattr(stack, "layers", None)
        if layers is None and hasattr(stack, "get_decoder"):  # a causal LM holding its decoder
            layers = getattr(decoder(stack), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            raise UnsupportedArchitectureError(
                f"{self.family}: the language model ({type(stack).__name__}) has no decoder layer list `layers`, "
                "where vlens reads the position ids the model computed"
            )
        return layers[0]

    def read_positions(self, args: tuple, kwargs: dict, batch_size: int) -> Int[Tensor, "batch pos"]:
        """The position ids out of a call of :meth:`positions_source`, one row per batch row
        (Hugging Face broadcasts a single ``[1, pos]`` row when every row is numbered alike)."""
        positions = kwargs.get("position_ids")
        if not isinstance(positions, Tensor) or positions.ndim != 2:
            raise UnsupportedArchitectureError(
                f"{self.family}: the first decoder layer was called without 2-D position_ids "
                f"(got {type(positions).__name__}); vlens reads the model's positions there"
            )
        return positions.expand(batch_size, -1) if positions.shape[0] == 1 else positions
