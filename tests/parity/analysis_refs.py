"""Independent computations of vlens's analyses from a Hugging Face reference model.

Every function here reads only the reference (a second, un-hooked copy loaded with
eager attention) and the token ids: HF's ``hidden_states`` and ``attentions``, its own
final norm and head, the position ids its own forward computes, and a plain loop of full
forwards over ``inputs_embeds``. Nothing here calls vlens's analysis code or the family
adapters' contract (``positions_after_removal`` and the rest are what these check).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tests.parity.helpers import hf_reference
from vlens import HookedVLM, VLMInputs


@dataclass(frozen=True)
class Family:
    """A tiny family checkpoint and what the tests expect of it.

    Attributes:
        module, builder, kwargs: ``tests.tiny.<module>.<builder>(path, **kwargs)``.
        lm_attr: The reference's attribute holding its own causal LM with a head
            (BLIP's ``language_model``), or None when the whole model takes
            ``inputs_embeds`` directly.
        reads_prompt: Whether image-token states depend on the prompt: the connector
            reads the instruction (InstructBLIP), or the language model attends from the
            image to the prompt after it (PaliGemma's bidirectional prefix).
        prompt_from_layer: With ``reads_prompt``, the first layer (of the ``n_layers + 1``
            residual-stream layers) whose image-token states depend on it: 0 for a connector
            that reads it, 1 for a language model that does.
        per_token: Inputs the forward takes one per token (Gemma3's token types).
        adapter: The vlens family (``VisionPrefixAdapter.family``) the checkpoint is; the
            registry test ties this table to the adapter registry.
    """

    module: str
    builder: str
    adapter: str
    kwargs: dict = field(default_factory=dict)
    lm_attr: Optional[str] = None
    reads_prompt: bool = False
    prompt_from_layer: int = 0
    per_token: tuple[str, ...] = ()


FAMILIES = {
    "llava": Family("llava", "build_llava", "llava"),
    "llava_siglip": Family("llava", "build_llava", "llava", {"tower": "siglip"}),
    "llava_next": Family("llava_next", "build_llava_next", "llava_next"),
    "idefics3": Family("idefics3", "build_idefics3", "idefics3"),
    "blip2": Family("blip", "build_blip2", "blip2", lm_attr="language_model"),
    "instructblip": Family("blip", "build_instructblip", "instructblip", lm_attr="language_model", reads_prompt=True),
    "gemma3": Family("gemma3", "build_gemma3", "gemma3", per_token=("token_type_ids",)),
    "smolvlm": Family("smolvlm", "build_smolvlm", "smolvlm"),
    "paligemma": Family(
        "paligemma", "build_paligemma", "paligemma", reads_prompt=True, prompt_from_layer=1,
        per_token=("token_type_ids",),
    ),
    "paligemma2": Family(
        "paligemma", "build_paligemma", "paligemma", {"gemma2": True}, reads_prompt=True, prompt_from_layer=1,
        per_token=("token_type_ids",),
    ),
    "llava_onevision": Family("llava_onevision", "build_llava_onevision", "llava_onevision"),
    "mistral3": Family("mistral3", "build_mistral3", "mistral3"),
}


@dataclass
class Tiny:
    name: str
    family: Family
    model: HookedVLM
    reference: torch.nn.Module


def load_tiny(name: str, tmp: Path) -> Tiny:
    fam = FAMILIES[name]
    builder: Callable = getattr(importlib.import_module(f"tests.tiny.{fam.module}"), fam.builder)
    path = builder(tmp, **fam.kwargs)
    model = HookedVLM.from_pretrained(path, device="cpu")
    return Tiny(name, fam, model, hf_reference(model, path))


# ---- pieces of the reference ------------------------------------------------------------


def decoder_of(reference: torch.nn.Module) -> torch.nn.Module:
    return reference.get_decoder()


def decoder_layers(reference: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    for name, module in decoder_of(reference).named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == n_layers:
            return module
    raise AssertionError("no decoder layer list found in the reference")


def final_norm(reference: torch.nn.Module) -> torch.nn.Module:
    for name, module in decoder_of(reference).named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("norm", "final_layer_norm") and ".layers." not in name:
            return module
    raise AssertionError("no final norm found in the reference")


def image_token_id(reference: torch.nn.Module) -> int:
    config = reference.config
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise AssertionError("reference config has no image token id")


def image_positions(reference: torch.nn.Module, input_ids: torch.Tensor, row: int = 0) -> torch.Tensor:
    return (input_ids[row] == image_token_id(reference)).nonzero().flatten()


def residual_states(reference: torch.nn.Module, inputs: VLMInputs, n_layers: int) -> tuple[list[torch.Tensor], Any]:
    """HF's hidden states with the last one taken before the final norm (a hook on the last
    decoder layer), so index l is the input of layer l / output of layer l - 1; and the outputs."""
    captured = {}

    def grab(_m, _args, out):
        captured["last"] = (out[0] if isinstance(out, tuple) else out).detach()

    handle = decoder_layers(reference, n_layers)[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = reference(**inputs.model_kwargs(), output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        hidden = out.language_model_outputs.hidden_states
    assert len(hidden) == n_layers + 1
    return [h.float() for h in hidden[:-1]] + [captured["last"].float()], out


def attentions(out: Any) -> tuple[torch.Tensor, ...]:
    found = getattr(out, "attentions", None)
    return found if found is not None else out.language_model_outputs.attentions


def merged_embeddings(reference: torch.nn.Module, inputs: VLMInputs) -> torch.Tensor:
    """The ``inputs_embeds`` HF hands its decoder (image features merged in)."""
    captured = {}

    def grab(_m, _args, kwargs):
        captured["e"] = kwargs["inputs_embeds"].detach()

    handle = decoder_of(reference).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            reference(**inputs.model_kwargs())
    finally:
        handle.remove()
    return captured["e"]


def lm_target(tiny: Tiny) -> torch.nn.Module:
    """The reference module that runs the language model on ``inputs_embeds``."""
    return getattr(tiny.reference, tiny.family.lm_attr) if tiny.family.lm_attr else tiny.reference


class _Stop(Exception):
    pass


def _positions_reaching_layer_0(tiny: Tiny, run: Callable[[], Any]) -> torch.Tensor:
    """The ``position_ids`` the reference hands its first decoder layer while ``run()``
    runs it (Hugging Face passes every layer the positions it computed), ``[batch, pos]``."""
    captured = {}

    def grab(_m, _args, kwargs):
        captured["p"] = kwargs["position_ids"].detach()
        raise _Stop

    handle = decoder_layers(tiny.reference, tiny.model.n_layers)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["p"]


def full_positions(tiny: Tiny, inputs: VLMInputs) -> torch.Tensor:
    """The positions the reference's own forward gives the batch's tokens, ``[batch, pos]``."""
    positions = _positions_reaching_layer_0(tiny, lambda: tiny.reference(**inputs.model_kwargs()))
    return positions.expand(inputs.batch_size, -1)


def reduced_positions(tiny: Tiny, embeds: torch.Tensor, per_token: Optional[dict] = None) -> torch.Tensor:
    """The positions Hugging Face gives a sequence of these embeddings ``[1, n, d]``: the
    shortened sequence of a token-removal variant, numbered as the processor's own shorter
    sequence would be.

    A family whose reference computes its positions with ``get_rope_index`` (multi-axis
    rotary positions from the image grids) has no such rule here yet: the reference refuses
    rather than guess one. For every other family the reference asks the model itself: it
    runs the language model on the embeddings without position ids and reads the ones its
    forward computed (for the 1-D families that is HF's default, ``arange`` of the reduced
    length after the cache, or OPT's cumulative attention mask minus one, which is what
    their processors' shorter sequence gets).
    """
    if any(hasattr(m, "get_rope_index") for m in (tiny.reference, getattr(tiny.reference, "model", None))):
        raise NotImplementedError(
            f"{tiny.name}: positions come from get_rope_index; add the reference rule for a shortened sequence"
        )
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return _positions_reaching_layer_0(
        tiny, lambda: lm_target(tiny)(inputs_embeds=embeds, attention_mask=mask, **(per_token or {}))
    )


def lm_logits(
    tiny: Tiny, embeds: torch.Tensor, per_token: Optional[dict] = None, positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Logits of a plain full forward of the reference's language model on ``embeds`` [1, n, d]
    (with the family's per-token inputs for those positions) at ``positions``, by default the
    ones the reference computes for them (:func:`reduced_positions`)."""
    if positions is None:
        positions = reduced_positions(tiny, embeds, per_token)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    target = lm_target(tiny)
    return target(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **(per_token or {})).logits


def answer_ce(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean CE of the answer tokens in a reduced sequence; ``kept`` = original positions kept."""
    new_index = {int(p): i for i, p in enumerate(kept.tolist())}
    rows = torch.tensor([new_index[int(t)] - 1 for t in answer])
    return float(torch.nn.functional.cross_entropy(logits[0, rows].float(), ids[answer]))


def per_token_inputs(tiny: Tiny, inputs: VLMInputs) -> dict:
    return {name: inputs.extras[name] for name in tiny.family.per_token}


def reduced_loss(
    tiny: Tiny, embeds: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor, removed: set, per_token: dict
) -> float:
    """The answer loss with the positions in ``removed`` taken out of the sequence."""
    kept = torch.tensor([p for p in range(embeds.shape[1]) if p not in removed])
    with torch.no_grad():
        logits = lm_logits(tiny, embeds[:, kept], {k: v[:, kept] for k, v in per_token.items()})
    return answer_ce(logits, ids, answer, kept)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
