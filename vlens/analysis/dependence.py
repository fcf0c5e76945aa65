"""Do the visual tokens' hidden states depend on the prompt?

In a causal language model that reads the image before the instruction they cannot:
the image tokens' states only see what precedes them. Where the connector reads the
instruction (a query connector that is given the prompt) they can, from the input
embeddings on. This analysis measures it rather than assuming either.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens.analysis._common import ShortRepr, long_frame, resid_hooks, typechecked
from vlens.analysis.similarity import unit
from vlens.errors import AnalysisInputError

if TYPE_CHECKING:
    from vlens.model import HookedVLM


def required_hooks(model: "HookedVLM") -> list[str]:
    """Hooks :func:`prompt_dependence` caches (it runs the model itself)."""
    return resid_hooks(model.n_layers)


@typechecked
@dataclass(frozen=True, eq=False, repr=False)
class PromptDependenceResult(ShortRepr):
    """How much the image tokens' residual stream changes across prompts, per layer.

    The same image is run with each prompt (one at a time). With ``h_p[l, i]`` the
    state of image token i at layer l under prompt p (layer 0 = input embeddings,
    l >= 1 = ``blocks.{l-1}.hook_resid_post``), in float32, over all pairs p < q:

    * ``per_token[l, i] = mean_{p<q} (1 - cos(h_p[l, i], h_q[l, i]))``
    * ``per_layer[l] = mean_i per_token[l, i]`` (0: the prompt changes nothing)
    * ``max_abs_diff[l] = max_{p<q, i, d} |h_p[l, i, d] - h_q[l, i, d]|``

    Attributes:
        per_layer: ``[layer]``.
        per_token: ``[layer, img]``.
        max_abs_diff: ``[layer]``.
        image_positions: Image-token positions under each prompt, ``[prompt, img]``.
        prompts: The prompts.
    """

    per_layer: Float[Tensor, " layer"]
    per_token: Float[Tensor, "layer img"]
    max_abs_diff: Float[Tensor, " layer"]
    image_positions: Int[Tensor, "prompt img"]
    prompts: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame:
        """Long format per layer: layer, cosine_distance, max_abs_diff."""
        return long_frame(
            {"cosine_distance": self.per_layer, "max_abs_diff": self.max_abs_diff}, dims=("layer",), batched=False
        )


def prompt_dependence(model: "HookedVLM", image: Any, prompts: Sequence[str]) -> PromptDependenceResult:
    """Per layer, how much the image tokens' states vary across prompts (see
    :class:`PromptDependenceResult`).

    Args:
        model: A ``HookedVLM``.
        image: One image (or a list of images for a multi-image prompt).
        prompts: At least two prompts.
    """
    if isinstance(prompts, str) or len(prompts) < 2:
        raise AnalysisInputError(f"prompt_dependence needs a list of at least two prompts, got {prompts!r}")
    names = required_hooks(model)
    states, positions = [], []
    for prompt in prompts:
        inputs = model.prepare(image, prompt)
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names_filter=names)
        img = inputs.layout.image_positions(0)
        if positions and img.numel() != positions[0].numel():
            raise AnalysisInputError(
                f"prompt {prompt!r} gives {img.numel()} image tokens but {prompts[0]!r} gives "
                f"{positions[0].numel()}; the image tokens must correspond one to one"
            )
        states.append(torch.stack([cache[n][0, img.to(cache[n].device)].float().cpu() for n in names]))
        positions.append(img)
    per_token, max_diff = [], []
    for p, q in itertools.combinations(range(len(prompts)), 2):
        per_token.append(1.0 - (unit(states[p]) * unit(states[q])).sum(-1))
        max_diff.append((states[p] - states[q]).abs().amax(dim=(1, 2)))
    tokens = torch.stack(per_token).mean(0)
    return PromptDependenceResult(
        per_layer=tokens.mean(-1),
        per_token=tokens,
        max_abs_diff=torch.stack(max_diff).amax(0),
        image_positions=torch.stack(positions),
        prompts=tuple(prompts),
    )
