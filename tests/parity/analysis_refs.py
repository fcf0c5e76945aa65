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
        deepstack: Whether the text model adds DeepStack features at image positions after
            its first layers (Qwen3-VL): the per-token inputs are then those features, which
            the reference computes with its own vision tower, and its language model runs
            as the text model plus the head (the whole model on ``inputs_embeds`` drops them).
    """

    module: str
    builder: str
    adapter: str
    kwargs: dict = field(default_factory=dict)
    lm_attr: Optional[str] = None
    reads_prompt: bool = False
    prompt_from_layer: int = 0
    per_token: tuple[str, ...] = ()
    deepstack: bool = False


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
    "qwen2_vl": Family("qwen2_vl", "build_qwen2_vl", "qwen2_vl"),
    "qwen2_5_vl": Family("qwen2_vl", "build_qwen2_5_vl", "qwen2_5_vl"),
    "qwen3_vl": Family(
        "qwen2_vl", "build_qwen3_vl", "qwen3_vl", per_token=("visual_pos_masks", "deepstack_visual_embeds"),
        deepstack=True,
    ),
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


def _rope_index_owner(tiny: Tiny) -> Optional[torch.nn.Module]:
    """The reference module with ``get_rope_index`` (M-RoPE families), None for the others."""
    return next((m for m in (getattr(tiny.reference, "model", None), tiny.reference) if hasattr(m, "get_rope_index")), None)


def full_positions(tiny: Tiny, inputs: VLMInputs) -> torch.Tensor:
    """The positions the reference's own forward gives the batch's tokens: ``[batch, pos]``, or
    ``[batch, 3, pos]`` from Hugging Face's ``get_rope_index`` for an M-RoPE family (its decoder
    layers receive no positions; the model computes them there)."""
    owner = _rope_index_owner(tiny)
    if owner is not None:
        kwargs = inputs.model_kwargs()
        with torch.no_grad():
            positions, _ = owner.get_rope_index(
                kwargs["input_ids"], kwargs["mm_token_type_ids"], kwargs.get("image_grid_thw"),
                attention_mask=kwargs["attention_mask"],
            )
        return positions.permute(1, 0, 2)
    positions = _positions_reaching_layer_0(tiny, lambda: tiny.reference(**inputs.model_kwargs()))
    return positions.expand(inputs.batch_size, -1)


def reduced_positions(
    tiny: Tiny,
    embeds: torch.Tensor,
    per_token: Optional[dict] = None,
    inputs: Optional[VLMInputs] = None,
    kept: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The positions Hugging Face gives a sequence of these embeddings ``[1, n, d]``: the
    shortened sequence of a token-removal variant, numbered as the processor's own shorter
    sequence would be.

    A family whose reference computes its positions with ``get_rope_index`` (M-RoPE: (t, h, w)
    positions from the image grids) numbers a shortened sequence by the definition in
    docs/analyses.md: each kept token keeps the position ``get_rope_index`` gives it in the
    full row (``inputs``, row 0; ``kept``: its kept positions), ``[1, 3, n]``. For every other
    family the reference asks the model itself: it runs the language model on the embeddings
    without position ids and reads the ones its forward computed (for the 1-D families that is
    HF's default, ``arange`` of the reduced length after the cache, or OPT's cumulative
    attention mask minus one, which is what their processors' shorter sequence gets).
    """
    if _rope_index_owner(tiny) is not None:
        if inputs is None or kept is None:
            raise TypeError(f"{tiny.name}: M-RoPE positions of a shortened row need its inputs and kept positions")
        return full_positions(tiny, inputs)[:1, :, kept]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return _positions_reaching_layer_0(
        tiny, lambda: lm_target(tiny)(inputs_embeds=embeds, attention_mask=mask, **(per_token or {}))
    )


def lm_logits(
    tiny: Tiny,
    embeds: torch.Tensor,
    per_token: Optional[dict] = None,
    positions: Optional[torch.Tensor] = None,
    inputs: Optional[VLMInputs] = None,
    kept: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits of a plain full forward of the reference's language model on ``embeds`` [1, n, d]
    (with the family's per-token inputs for those positions) at ``positions``, by default the
    ones the reference computes for them (:func:`reduced_positions`; an M-RoPE family's need
    the row's ``inputs`` and ``kept`` positions, default all)."""
    if positions is None:
        if inputs is not None and kept is None:
            kept = torch.arange(embeds.shape[1])
        positions = reduced_positions(tiny, embeds, per_token, inputs, kept)
    if positions.ndim == 3:  # [1, axes, n] -> Hugging Face's [axes, 1, n]
        positions = positions.permute(1, 0, 2)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if tiny.family.deepstack:
        return deepstack_lm_logits(tiny, embeds, mask, positions, per_token or {})
    target = lm_target(tiny)
    return target(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **(per_token or {})).logits


def deepstack_lm_logits(
    tiny: Tiny, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, per_token: dict
) -> torch.Tensor:
    """The reference's text model with the kept tokens' DeepStack features, then its head."""
    visual = per_token["visual_pos_masks"].bool()
    features = per_token["deepstack_visual_embeds"][visual]  # [n_visual, levels, d]
    extra = {}
    if bool(visual.any()):
        extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": list(features.unbind(1))}
    text = tiny.reference.model.language_model
    hidden = text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **extra).last_hidden_state
    return tiny.reference.lm_head(hidden)


def answer_ce(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean CE of the answer tokens in a reduced sequence; ``kept`` = original positions kept."""
    new_index = {int(p): i for i, p in enumerate(kept.tolist())}
    rows = torch.tensor([new_index[int(t)] - 1 for t in answer])
    return float(torch.nn.functional.cross_entropy(logits[0, rows].float(), ids[answer]))


def per_token_inputs(tiny: Tiny, inputs: VLMInputs) -> dict:
    """The per-token inputs of row 0..: the processor's (``inputs.extras``), or for a DeepStack
    family the reference vision tower's DeepStack features scattered to the image positions."""
    if not tiny.family.deepstack:
        return {name: inputs.extras[name] for name in tiny.family.per_token}
    kwargs = inputs.model_kwargs()
    with torch.no_grad():
        out = tiny.reference.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True)
    levels = [torch.cat(list(level), dim=0) for level in out.deepstack_features]
    visual = inputs.input_ids == image_token_id(tiny.reference)
    stacked = torch.zeros(*visual.shape, len(levels), levels[0].shape[-1])
    stacked[visual] = torch.stack(levels, dim=1)
    return {"visual_pos_masks": visual, "deepstack_visual_embeds": stacked}


def reduced_loss(
    tiny: Tiny,
    embeds: torch.Tensor,
    ids: torch.Tensor,
    answer: torch.Tensor,
    removed: set,
    per_token: dict,
    inputs: Optional[VLMInputs] = None,
) -> float:
    """The answer loss with the positions in ``removed`` taken out of the sequence (``inputs``:
    the row, which an M-RoPE family's positions are read from)."""
    kept = torch.tensor([p for p in range(embeds.shape[1]) if p not in removed])
    with torch.no_grad():
        logits = lm_logits(
            tiny, embeds[:, kept], {k: v[:, kept] for k, v in per_token.items()}, inputs=inputs, kept=kept
        )
    return answer_ce(logits, ids, answer, kept)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
