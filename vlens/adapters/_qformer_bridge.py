"""TransformerLens bridge pieces for the BLIP family (BLIP-2, InstructBLIP, MiniGPT-4).

TransformerLens 4.3 has no adapter for ``Blip2ForConditionalGeneration`` or
``InstructBlipForConditionalGeneration``. This module supplies one, built only from
TransformerLens's public generalized components, and registers it with
``ArchitectureAdapterFactory.register_adapter`` (the factory
``build_bridge_from_module`` consults). Nothing in TransformerLens is edited or patched.

Every bridge component here delegates its computation to the wrapped Hugging Face
module (hook_in -> HF forward -> hook_out), so numerics are Hugging Face's own. The hook
tree of a BLIP model:

``vision_encoder``                       the BLIP ViT (``vision_model``)
    ``.embeddings``                      CLS + patches + positions
    ``.encoder_layers.{i}``              ``hook_resid_pre`` / ``hook_resid_post``
        ``.attn.hook_pattern``           [batch, head, 1 + patches, 1 + patches]
        ``.ln1 .ln2 .mlp .attn.qkv .attn.o``
    ``.hook_out``                        after the post-LayerNorm: what the Q-Former reads
``qformer``                              ``hook_in`` = the learned query tokens
    ``.embed_ln`` (BLIP-2) / ``.embeddings`` (InstructBLIP: queries + instruction)
    ``.layers.{i}``                      ``hook_resid_pre`` / ``hook_resid_post``,
                                         ``hook_query_states`` (the query positions)
        ``.attn.hook_pattern``           self-attention among queries (and text)
        ``.cross_attn.hook_pattern``     queries -> [CLS + patches] of the image
        ``.attn_out .ln1 .cross_attn_out .ln_cross .mlp .ln2``
``vision_projector``                     ``language_projection`` (MiniGPT-4: ``llama_proj``)
``embed``, ``blocks.{l}``, ``ln_final``, ``unembed``   the language model, with the
                                         names TransformerLens's OPT / Llama adapters give

The vision and Q-Former attentions are computed in the bridge exactly as HF's eager
BLIP attention computes them (tested equal), so their ``hook_attn_scores`` are the real
pre-softmax scores and ``hook_pattern`` edits take effect (e.g. confining a query's
cross-attention to a region of the image).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Protocol, cast

import torch
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.supported_architectures.llama import LlamaArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.opt import OptArchitectureAdapter

from vlens import _tl  # noqa: F401  (restores the transformers log level TL's import changes)
from vlens.errors import UnsupportedArchitectureError

# Language towers the adapter maps, with the TransformerLens adapter whose mapping it reuses.
LANGUAGE_TOWERS: dict[str, type[ArchitectureAdapter]] = {
    "opt": OptArchitectureAdapter,
    "llama": LlamaArchitectureAdapter,
}


def _attention_config(n_heads: int, d_model: int) -> SimpleNamespace:
    """The dimensions an ``AttentionBridge`` reshapes q/k/v/z hooks with (not the LM's)."""
    return SimpleNamespace(n_heads=n_heads, d_model=d_model, d_head=d_model // n_heads)


def _delegate(component: GeneralizedComponent, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """hook_in -> the wrapped HF module -> hook_out, for modules returning a tensor or tuple."""
    if component.original_component is None:
        raise RuntimeError(f"original component not set for {component.name}")
    hidden_states = component.hook_in(hidden_states)
    output = component.original_component(hidden_states, *args, **kwargs)
    if isinstance(output, tuple):
        return (component.hook_out(output[0]),) + output[1:]
    return component.hook_out(output)


class _HFAttention(Protocol):
    """What the eager path reads off the wrapped Hugging Face attention module: plain
    attributes, which torch's stubs for ``nn.Module.__getattr__`` would type ``Tensor | Module``.
    The module is set when the bridge is built, before any forward runs."""

    training: bool
    attention_dropout: float


class _HFVisionAttention(_HFAttention, Protocol):
    """``Blip2Attention`` / ``InstructBlipAttention``."""

    num_heads: int
    scale: float


class _HFQFormerAttention(_HFAttention, Protocol):
    """``Blip2QFormerMultiHeadAttention`` / ``InstructBlipQFormerMultiHeadAttention``."""

    attention_head_size: int
    scaling: float


class BlipAttentionBridge(AttentionBridge):
    """BLIP's eager attention computed in the bridge, op for op as Hugging Face's
    ``eager_attention_forward`` for BLIP (scores = q k^T * scale [+ mask], softmax in the
    input dtype, no upcast), so ``hook_attn_scores`` holds the real pre-softmax scores and
    an edit made at ``hook_pattern`` re-weights the output. Any other attention
    implementation is delegated to the HF module (patterns then read-only). No pre-norm
    residual fork, so no ``hook_attn_in``/``hook_*_input``.
    """

    supports_split_qkv_fork = False

    def _eager(self) -> bool:
        config = getattr(self.original_component, "config", None)
        return getattr(config, "_attn_implementation", "eager") == "eager"

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, head, pos, d_head] q/k/v -> ([batch, pos, head * d_head] output, pattern)."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = torch.nn.functional.softmax(scores, dim=-1)
        hf = cast(_HFAttention, self.original_component)
        pattern = torch.nn.functional.dropout(pattern, p=float(hf.attention_dropout), training=hf.training)
        pattern = self.hook_pattern(pattern)
        out = torch.matmul(pattern, v).transpose(1, 2).contiguous()
        return out.reshape(*out.shape[:2], -1).contiguous(), pattern


class BlipVisionAttentionBridge(BlipAttentionBridge):
    """The ViT's attention: one fused ``qkv`` projection, then ``projection`` (``o``)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        if not self._eager():
            return super().forward(hidden_states, **kwargs)
        hf = cast(_HFVisionAttention, self.original_component)
        hidden_states = self.hook_in(hidden_states)
        batch, pos, width = hidden_states.shape
        mixed = self.qkv(hidden_states).reshape(batch, pos, 3, hf.num_heads, width // hf.num_heads)
        q, k, v = mixed.permute(2, 0, 3, 1, 4)
        out, pattern = self._attend(q, k, v, hf.scale, None)
        return self.hook_out(self.o(out)), pattern


class BlipVisionLayerBridge(GeneralizedComponent):
    """One pre-norm ViT layer of the BLIP vision encoder (fused ``qkv``, ``projection``)."""

    is_list_item: bool = True
    hook_aliases = {
        "hook_resid_pre": "hook_in",
        "hook_resid_post": "hook_out",
        "hook_attn_out": "attn.hook_out",
        "hook_mlp_out": "mlp.hook_out",
    }

    def __init__(self, name: str, attn_config: SimpleNamespace) -> None:
        super().__init__(
            name,
            attn_config,
            submodules={
                "ln1": NormalizationBridge(name="layer_norm1", config=attn_config, use_native_layernorm_autograd=True),
                "attn": BlipVisionAttentionBridge(
                    name="self_attn",
                    config=attn_config,
                    fused_qkv=True,
                    is_causal=False,
                    submodules={"qkv": LinearBridge(name="qkv"), "o": LinearBridge(name="projection")},
                ),
                "ln2": NormalizationBridge(name="layer_norm2", config=attn_config, use_native_layernorm_autograd=True),
                "mlp": MLPBridge(
                    name="mlp", config=attn_config,
                    submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
                ),
            },
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _delegate(self, hidden_states, *args, **kwargs)


class BlipVisionEncoderBridge(GeneralizedComponent):
    """The BLIP vision tower: embeddings, encoder layers (then HF's post-LayerNorm)."""

    hook_aliases = {"hook_vision_embed": "embeddings.hook_out", "hook_vision_out": "hook_out"}

    def __init__(self, name: str, attn_config: SimpleNamespace) -> None:
        super().__init__(
            name,
            attn_config,
            submodules={
                "embeddings": GeneralizedComponent(name="embeddings"),
                "encoder_layers": BlipVisionLayerBridge(name="encoder.layers", attn_config=attn_config),
                # No bridge on post_layernorm: HF applies it twice (patch states, then the
                # pooled CLS), so its hooks would fire twice with different tensors. The
                # tower's hook_out is its output on the patch states, what the Q-Former reads.
            },
        )

    def forward(self, pixel_values: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> Any:
        if self.original_component is None:
            raise RuntimeError(f"original component not set for {self.name}")
        output = self.original_component(self.hook_in(pixel_values), *args, **kwargs)
        if isinstance(output, tuple):
            return (self.hook_out(output[0]),) + output[1:]
        output.last_hidden_state = self.hook_out(output.last_hidden_state)
        return output


class QFormerAttentionBridge(BlipAttentionBridge):
    """A Q-Former (BERT-style) attention: ``query``/``key``/``value`` inside the module,
    the output dense layer outside it (the layer's ``attn_out``), so there is no ``hook_z``.
    For cross-attention the keys and values are the image's [CLS + patches]."""

    hook_aliases = {"hook_q": "q.hook_out", "hook_k": "k.hook_out", "hook_v": "v.hook_out"}

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        if not self._eager():
            return super().forward(
                hidden_states=hidden_states, attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask, **kwargs,
            )
        hf = cast(_HFQFormerAttention, self.original_component)
        hidden_states = self.hook_in(hidden_states)
        cross = encoder_hidden_states is not None
        source = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        d_head = hf.attention_head_size
        q = self.q(hidden_states).view(*hidden_states.shape[:-1], -1, d_head).transpose(1, 2)
        k = self.k(source).view(*source.shape[:-1], -1, d_head).transpose(1, 2)
        v = self.v(source).view(*source.shape[:-1], -1, d_head).transpose(1, 2)
        out, pattern = self._attend(q, k, v, hf.scaling, mask)
        return self.hook_out(out), pattern


class QFormerLayerBridge(GeneralizedComponent):
    """One Q-Former layer: post-norm self-attention over [queries (+ instruction)],
    cross-attention from the queries to the image (every ``cross_attention_frequency``
    layers), and separate feed-forward paths for query and text positions.

    ``hook_query_states`` fires on the query positions of the layer output (for BLIP-2
    that is the whole output); an edit made there flows on into the next layer.
    """

    is_list_item: bool = True
    hook_aliases = {
        "hook_resid_pre": "hook_in",
        "hook_resid_post": "hook_out",
        "hook_attn_out": "attn_out.hook_out",
        "hook_cross_attn_out": "cross_attn_out.hook_out",
        "hook_mlp_out": "mlp.out.hook_out",
    }

    def __init__(self, name: str, attn_config: SimpleNamespace, reads_text: bool) -> None:
        def attention(path: str, optional: bool = False) -> AttentionBridge:
            return QFormerAttentionBridge(
                name=path,
                config=attn_config,
                is_causal=False,
                is_cross_attention=False,  # keys come in as encoder_hidden_states, not key_value_states
                optional=optional,
                submodules={"q": LinearBridge(name="query"), "k": LinearBridge(name="key"), "v": LinearBridge(name="value")},
            )

        def norm(path: str, optional: bool = False) -> NormalizationBridge:
            return NormalizationBridge(
                name=path, config=attn_config, use_native_layernorm_autograd=True, optional=optional
            )

        submodules: dict[str, GeneralizedComponent] = {
            "attn": attention("attention.attention"),
            "attn_out": LinearBridge(name="attention.output.dense"),
            "ln1": norm("attention.output.LayerNorm"),
            "cross_attn": attention("crossattention.attention", optional=True),
            "cross_attn_out": LinearBridge(name="crossattention.output.dense", optional=True),
            "ln_cross": norm("crossattention.output.LayerNorm", optional=True),
            "mlp": MLPBridge(
                name=None, config=attn_config,
                submodules={"in": LinearBridge(name="intermediate_query.dense"), "out": LinearBridge(name="output_query.dense")},
            ),
            "ln2": norm("output_query.LayerNorm"),
        }
        if reads_text:
            submodules["mlp_text"] = MLPBridge(
                name=None, config=attn_config,
                submodules={"in": LinearBridge(name="intermediate.dense"), "out": LinearBridge(name="output.dense")},
            )
            submodules["ln2_text"] = norm("output.LayerNorm")
        super().__init__(name, attn_config, submodules=submodules)
        self.hook_query_states = HookPoint()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = _delegate(self, hidden_states, *args, **kwargs)
        n_query = int(kwargs.get("query_length") or out.shape[1])
        queries = out[:, :n_query]
        hooked = self.hook_query_states(queries)
        if hooked is not queries:
            out = torch.cat([hooked, out[:, n_query:]], dim=1)
        return out


class QFormerBridge(GeneralizedComponent):
    """The Q-Former. ``hook_in`` (alias ``hook_query_tokens``) is the learned query
    embeddings entering it, ``hook_out`` its last hidden state (queries, then text)."""

    hook_aliases = {"hook_query_tokens": "hook_in", "hook_qformer_out": "hook_out"}

    def __init__(self, name: str, attn_config: SimpleNamespace, reads_text: bool) -> None:
        submodules: dict[str, GeneralizedComponent] = {}
        if reads_text:
            submodules["embeddings"] = GeneralizedComponent(name="embeddings")
        else:
            submodules["embed_ln"] = NormalizationBridge(
                name="layernorm", config=attn_config, use_native_layernorm_autograd=True
            )
        submodules["layers"] = QFormerLayerBridge(name="encoder.layer", attn_config=attn_config, reads_text=reads_text)
        super().__init__(name, attn_config, submodules=submodules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.original_component is None:
            raise RuntimeError(f"original component not set for {self.name}")
        if kwargs.get("query_embeds") is not None:
            kwargs["query_embeds"] = self.hook_in(kwargs["query_embeds"])
        output = self.original_component(*args, **kwargs)
        if isinstance(output, tuple):
            return (self.hook_out(output[0]),) + output[1:]
        output.last_hidden_state = self.hook_out(output.last_hidden_state)
        return output


class Blip2ArchitectureAdapter(ArchitectureAdapter):
    """TransformerLens adapter for ``Blip2ForConditionalGeneration`` with a decoder-only tower.

    The mapping needs the vision, Q-Former and text sub-configs, which TransformerLens's
    bridge config does not carry, so it is built in :meth:`prepare_model` (called with
    the loaded model before the bridge is assembled). The language-model part is the
    mapping of TransformerLens's own OPT or Llama adapter, re-rooted under
    ``language_model``.
    """

    qformer_reads_text: bool = False
    applicable_phases: list[int] = []

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self.cfg.attn_implementation = "eager"
        self._extract_vision_dims(cfg)
        self.component_mapping = {}

    def prepare_model(self, hf_model: Any) -> None:
        config = hf_model.config
        text_type = config.text_config.model_type
        if not getattr(config, "use_decoder_only_language_model", False) or text_type not in LANGUAGE_TOWERS:
            raise UnsupportedArchitectureError(
                f"{type(hf_model).__name__} with a {text_type!r} language model is not supported: vlens maps "
                f"decoder-only towers {sorted(LANGUAGE_TOWERS)}; encoder-decoder towers (Flan-T5) are not supported"
            )
        super().prepare_model(hf_model)
        language = LANGUAGE_TOWERS[text_type](self.cfg)  # sets the LM's norm/positional flags on self.cfg
        language._reprefix_components("model.", "language_model.model.")
        language._reprefix_components("lm_head", "language_model.lm_head")
        self.weight_processing_conversions = language.weight_processing_conversions
        self.supports_fold_ln = getattr(language, "supports_fold_ln", True)
        self.supports_center_writing_weights = getattr(language, "supports_center_writing_weights", True)
        vision, qformer = config.vision_config, config.qformer_config
        self.component_mapping = {
            "vision_encoder": BlipVisionEncoderBridge(
                name="vision_model",
                attn_config=_attention_config(vision.num_attention_heads, vision.hidden_size),
            ),
            "qformer": QFormerBridge(
                name="qformer",
                attn_config=_attention_config(qformer.num_attention_heads, qformer.hidden_size),
                reads_text=self.qformer_reads_text,
            ),
            "vision_projector": VisionProjectionBridge(name="language_projection"),
            **language.components,
        }


class InstructBlipArchitectureAdapter(Blip2ArchitectureAdapter):
    """TransformerLens adapter for ``InstructBlipForConditionalGeneration``: as BLIP-2,
    but the Q-Former embeds the instruction beside the queries."""

    qformer_reads_text = True


TL_ARCHITECTURES: dict[str, type[ArchitectureAdapter]] = {
    "Blip2ForConditionalGeneration": Blip2ArchitectureAdapter,
    "InstructBlipForConditionalGeneration": InstructBlipArchitectureAdapter,
}


def register() -> None:
    """Make the BLIP adapters reachable through TransformerLens's public factory registry."""
    for name, adapter in TL_ARCHITECTURES.items():
        ArchitectureAdapterFactory.register_adapter(name, adapter)
