"""Parity checks shared by the BLIP-family tests: every stage against Hugging Face's own.

The reference is a second, un-hooked copy of the checkpoint (eager attention, fp32).
Its vision tower and Q-Former are run on their own with ``output_attentions=True``,
because ``Blip2ForConditionalGeneration.forward`` does not pass that flag to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.parity.helpers import TOL, max_diff
from vlens import HookedVLM, VLMInputs

# Hook names the BLIP adapters promise fire on every forward ({l}: LM block,
# {v}: vision layer, {q}: Q-Former layer, {c}: Q-Former layer with cross-attention,
# every cross_attention_frequency-th).
CLAIMED_HOOKS = (
    "vision_encoder.hook_in",
    "vision_encoder.hook_out",
    "vision_encoder.embeddings.hook_out",
    "vision_encoder.encoder_layers.{v}.hook_resid_pre",
    "vision_encoder.encoder_layers.{v}.hook_resid_post",
    "vision_encoder.encoder_layers.{v}.hook_attn_out",
    "vision_encoder.encoder_layers.{v}.hook_mlp_out",
    "vision_encoder.encoder_layers.{v}.attn.hook_pattern",
    "vision_encoder.encoder_layers.{v}.attn.hook_z",
    "vision_encoder.encoder_layers.{v}.ln1.hook_out",
    "vision_encoder.encoder_layers.{v}.ln2.hook_out",
    "qformer.hook_query_tokens",
    "qformer.hook_out",
    "qformer.layers.{q}.hook_resid_pre",
    "qformer.layers.{q}.hook_resid_post",
    "qformer.layers.{q}.hook_query_states",
    "qformer.layers.{q}.attn.hook_pattern",
    "qformer.layers.{q}.attn.hook_q",
    "qformer.layers.{q}.attn.hook_k",
    "qformer.layers.{q}.attn.hook_v",
    "qformer.layers.{q}.hook_attn_out",
    "qformer.layers.{q}.ln1.hook_out",
    "qformer.layers.{c}.cross_attn.hook_pattern",
    "qformer.layers.{c}.cross_attn.hook_q",
    "qformer.layers.{c}.cross_attn.hook_k",
    "qformer.layers.{c}.cross_attn.hook_v",
    "qformer.layers.{c}.hook_cross_attn_out",
    "qformer.layers.{c}.ln_cross.hook_out",
    "qformer.layers.{q}.hook_mlp_out",
    "qformer.layers.{q}.ln2.hook_out",
    "vision_projector.hook_in",
    "vision_projector.hook_out",
    "hook_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.attn.hook_q",
    "blocks.{l}.attn.hook_k",
    "blocks.{l}.attn.hook_v",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.ln1.hook_normalized",
    "ln_final.hook_normalized",
    "hook_unembed",
)


def claimed_hook_names(model: HookedVLM, extra: tuple[str, ...] = ()) -> list[str]:
    config = model.hf_model.config
    layers = {
        "v": range(config.vision_config.num_hidden_layers),
        "q": range(config.qformer_config.num_hidden_layers),
        "c": cross_attention_layers(model),
        "l": range(model.n_layers),
    }
    names = []
    for pattern in (*CLAIMED_HOOKS, *extra):
        key = next((k for k in layers if "{" + k + "}" in pattern), None)
        if key is None:
            names.append(pattern)
        else:
            names += [pattern.format(**{key: i}) for i in layers[key]]
    return names


def cross_attention_layers(model: HookedVLM) -> list[int]:
    qformer = model.hf_model.config.qformer_config
    return [i for i in range(qformer.num_hidden_layers) if i % qformer.cross_attention_frequency == 0]


@dataclass
class Reference:
    """The HF reference's activations for one batch, stage by stage."""

    logits: torch.Tensor
    lm_hidden: tuple[torch.Tensor, ...]
    lm_attentions: tuple[torch.Tensor, ...]
    vision_hidden: tuple[torch.Tensor, ...]
    vision_attentions: tuple[torch.Tensor, ...]
    image_embeds: torch.Tensor
    qformer_hidden: tuple[torch.Tensor, ...]
    qformer_attentions: tuple[torch.Tensor, ...]
    qformer_cross_attentions: tuple[torch.Tensor, ...]
    projected: torch.Tensor


def qformer_forward(reference: torch.nn.Module, kwargs: dict, image_embeds: torch.Tensor):
    """HF's own Q-Former on ``image_embeds``, with every attention returned."""
    query_tokens = reference.query_tokens.expand(image_embeds.shape[0], -1, -1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    extra = {}
    if "qformer_input_ids" in kwargs:
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long)
        extra = {
            "input_ids": kwargs["qformer_input_ids"],
            "attention_mask": torch.cat([query_mask, kwargs["qformer_attention_mask"]], dim=1),
        }
    return reference.qformer(
        query_embeds=query_tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
        output_attentions=True, output_hidden_states=True, **extra,
    )


def reference_outputs(reference: torch.nn.Module, inputs: VLMInputs) -> Reference:
    kwargs = inputs.model_kwargs()
    with torch.no_grad():
        out = reference(**kwargs, output_hidden_states=True, output_attentions=True)
        vision = reference.vision_model(kwargs["pixel_values"], output_hidden_states=True, output_attentions=True)
        qformer = qformer_forward(reference, kwargs, vision.last_hidden_state)
        n_query = reference.config.num_query_tokens
        projected = reference.language_projection(qformer.last_hidden_state[:, :n_query])
    lm = out.language_model_outputs
    # HF records "attentions" by a module-name match on ".attention", which the
    # cross-attention modules ("crossattention.attention") also satisfy: drop those.
    cross_ids = {id(t) for t in qformer.cross_attentions}
    self_attentions = tuple(t for t in qformer.attentions if id(t) not in cross_ids)
    return Reference(
        logits=out.logits, lm_hidden=lm.hidden_states, lm_attentions=lm.attentions,
        vision_hidden=vision.hidden_states, vision_attentions=vision.attentions,
        image_embeds=vision.last_hidden_state, qformer_hidden=qformer.hidden_states,
        qformer_attentions=self_attentions, qformer_cross_attentions=qformer.cross_attentions,
        projected=projected,
    )


def assert_every_stage_matches_hf(model: HookedVLM, reference: torch.nn.Module, inputs: VLMInputs) -> dict[str, float]:
    """Logits, LM residuals and patterns, vision residuals and patterns, Q-Former
    self- and cross-attention patterns and query states, and the projected visual
    tokens all equal the HF reference's; returns the measured max abs diffs."""
    ref = reference_outputs(reference, inputs)
    n_query = model.hf_model.config.num_query_tokens
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    diffs = {"logits": max_diff(logits, ref.logits)}
    for layer in range(model.n_layers):
        if layer < model.n_layers - 1:  # HF's last hidden state has the final norm applied
            diffs[f"lm.resid_post.{layer}"] = max_diff(cache[f"blocks.{layer}.hook_resid_post"], ref.lm_hidden[layer + 1])
        diffs[f"lm.pattern.{layer}"] = max_diff(cache[f"blocks.{layer}.attn.hook_pattern"], ref.lm_attentions[layer])
    diffs["lm.resid_pre.0"] = max_diff(cache["blocks.0.hook_resid_pre"], ref.lm_hidden[0])
    for layer in range(len(ref.vision_attentions)):
        prefix = f"vision_encoder.encoder_layers.{layer}"
        diffs[f"vision.resid_post.{layer}"] = max_diff(cache[f"{prefix}.hook_resid_post"], ref.vision_hidden[layer + 1])
        diffs[f"vision.pattern.{layer}"] = max_diff(cache[f"{prefix}.attn.hook_pattern"], ref.vision_attentions[layer])
    diffs["vision.out"] = max_diff(cache["vision_encoder.hook_out"], ref.image_embeds)
    for layer in range(len(ref.qformer_attentions)):
        prefix = f"qformer.layers.{layer}"
        diffs[f"qformer.self_pattern.{layer}"] = max_diff(cache[f"{prefix}.attn.hook_pattern"], ref.qformer_attentions[layer])
        diffs[f"qformer.query_states.{layer}"] = max_diff(
            cache[f"{prefix}.hook_query_states"], ref.qformer_hidden[layer + 1][:, :n_query]
        )
    cross_layers = cross_attention_layers(model)
    assert len(cross_layers) == len(ref.qformer_cross_attentions)
    for layer, expected in zip(cross_layers, ref.qformer_cross_attentions):
        pattern = cache[f"qformer.layers.{layer}.cross_attn.hook_pattern"]
        diffs[f"qformer.cross_pattern.{layer}"] = max_diff(pattern, expected)
    diffs["projector.out"] = max_diff(cache["vision_projector.hook_out"], ref.projected)
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"differs from Hugging Face beyond {TOL}: {bad}"
    return diffs


def assert_language_model_alone_matches(model: HookedVLM, inputs: VLMInputs) -> float:
    """``run_language_model(input_embeddings(...))`` gives the full forward's logits, and
    the embeddings hold the projected query tokens at the image positions."""
    with torch.no_grad():
        full, cache = model.run_with_cache(inputs, names_filter="vision_projector.hook_out")
        lm = model.input_embeddings(inputs)
        alone, _ = model.run_language_model(lm.embeds, lm.position_ids, attention_mask=lm.attention_mask)
    span = inputs.layout.images[0][0]
    assert max_diff(lm.embeds[0, span.positions], cache["vision_projector.hook_out"][0]) == 0.0
    diff = max_diff(alone, full)
    assert diff <= TOL, f"the language model alone differs from the full forward by {diff}"
    return diff
