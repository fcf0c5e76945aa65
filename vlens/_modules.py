"""Typed access to what a Hugging Face model holds.

vlens keeps Hugging Face models as plain ``torch.nn.Module``. For any name a class does not
declare, torch's stubs type ``nn.Module.__getattr__`` as returning ``Tensor | Module``, so to a
type checker ``hf_model.get_input_embeddings()`` is a call on a Tensor and ``embedding.weight``
may be a Module. Each helper here is that plain attribute access or call, stated with the type it
really has (``typing.cast`` only: nothing is checked or converted at run time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def input_embeddings(hf_model: torch.nn.Module) -> torch.nn.Module:
    """``hf_model.get_input_embeddings()``: the token embedding module."""
    return cast(Callable[[], torch.nn.Module], hf_model.get_input_embeddings)()


def output_embeddings(hf_model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """``hf_model.get_output_embeddings()``: the output head (None for a model without one)."""
    return cast(Callable[[], Optional[torch.nn.Module]], hf_model.get_output_embeddings)()


def config(hf_model: torch.nn.Module) -> "PreTrainedConfig":
    """``hf_model.config``: the model's Hugging Face config."""
    return cast("PreTrainedConfig", hf_model.config)


def decoder(hf_model: torch.nn.Module) -> torch.nn.Module:
    """``hf_model.get_decoder()``: Hugging Face's own pick of the decoder module."""
    return cast(Callable[[], torch.nn.Module], hf_model.get_decoder)()


def generate(hf_model: torch.nn.Module, **kwargs: Any) -> Tensor:
    """``hf_model.generate(**kwargs)``: the token ids, prompt included (vlens never asks for
    ``return_dict_in_generate``, so the answer is a tensor, not a ``GenerateOutput``)."""
    return cast(Callable[..., Tensor], hf_model.generate)(**kwargs)


def submodule(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The child module ``module.<name>``."""
    return cast(torch.nn.Module, getattr(module, name))


def tensor(module: torch.nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``module.<name>`` (e.g. ``weight``)."""
    return cast(Tensor, getattr(module, name))
