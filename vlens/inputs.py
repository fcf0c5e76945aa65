"""``VLMInputs``: one prepared batch, ready for the model and for analyses."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import PIL.Image
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.layout import TokenLayout


@dataclass(frozen=True, eq=False)
class VLMInputs:
    """A right-padded batch of image + prompt (+ answer) examples.

    Attributes:
        input_ids: Token ids with every image placeholder expanded.
        attention_mask: 1 at real tokens, 0 at padding (right side only).
        pixel_values: The processor's image tensor (None for a text-only batch).
        extras: Every other tensor the Hugging Face forward takes for this family
            (the adapter's ``model_input_names``: image sizes, token types, ...).
        layout: Where the image, prompt and answer tokens are.
        images: The RGB images of each row, kept so analyses can re-prepare variants.
        prompts: The prompts as given (before the chat template).
        answers: The answers as given, or None per row.
        texts: The prompt text fed to the processor per row (template applied,
            answer excluded).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    pixel_values: Optional[Float[Tensor, "..."]]
    extras: dict[str, Tensor]
    layout: TokenLayout
    images: tuple[tuple[PIL.Image.Image, ...], ...] = field(repr=False)
    prompts: tuple[str, ...]
    answers: tuple[Optional[str], ...]
    texts: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Every tensor the Hugging Face model's forward takes, by its keyword."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        kwargs.update(self.extras)
        return kwargs

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "VLMInputs":
        """Move the tensors to ``device``; floating image tensors are also cast to ``dtype``."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            pixel_values=None if self.pixel_values is None else move(self.pixel_values),
            extras={k: move(v) for k, v in self.extras.items()},
        )


@dataclass(frozen=True, eq=False)
class LanguageModelInputs:
    """What the language model alone needs to re-run a batch, or a subset of its positions.

    From ``HookedVLM.input_embeddings``: captured in the model's own forward pass, so the
    embeddings are those with the image features merged in and the positions are the ones
    the model computed, not a rule vlens assumes.

    Attributes:
        embeds: The merged input embeddings the language model receives, model dtype.
        position_ids: The position ids it gave each token, batch axis first: ``[batch, pos]``,
            or ``[batch, axes, pos]`` for a multi-axis rotary family. Padding positions hold
            whatever the model gave them.
        attention_mask: 1 at real tokens, 0 at padding.
        extras: The family's per-token inputs (``adapter.per_token_inputs``), ``[batch, pos, ...]``
            each, on the embeddings' device.
    """

    embeds: Float[Tensor, "batch pos d_model"]
    position_ids: Int[Tensor, "batch *axes pos"]
    attention_mask: Int[Tensor, "batch pos"]
    extras: dict[str, Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.embeds.shape[0])
