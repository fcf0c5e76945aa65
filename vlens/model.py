"""``HookedVLM``: a vision LLM with every activation reachable by name.

A ``HookedVLM`` owns the Hugging Face model, its processor, the family adapter and a
TransformerLens 4 ``TransformerBridge`` built around the model. The bridge replaces the
model's submodules in place with hooked components, so running the Hugging Face
forward runs the bridge: numerics are Hugging Face's own (logits equal the HF model's)
and every ``HookPoint`` fires under its TransformerLens name.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlens._compat import layer_cache_problem, route_layer_cache
from vlens._modules import generate as hf_generate
from vlens._modules import input_embeddings, output_embeddings, tensor
from vlens._tl import TransformerBridge, build_bridge_from_module
from vlens.adapters import VisionPrefixAdapter, adapter_for
from vlens.cache import VLMCache
from vlens.errors import HookNameError, UnsupportedArchitectureError
from vlens.hooks import HookIndex, NamesFilter, hooked_tensor, stage_of
from vlens.inputs import LanguageModelInputs, VLMInputs
from vlens.loading import (
    load_config,
    load_hf_model,
    load_processor,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
)
from vlens.prepare import prepare_batch

HookFn = Callable[..., Optional[Tensor]]
HookSpec = tuple[Union[str, Callable[[str], bool]], HookFn]

_hook_levels = itertools.count(1_000_000)  # our own context levels, clear of TransformerLens's


class _StopForward(Exception):
    """Raised inside a pre-hook to end a forward pass once what it needed was captured."""


@dataclass(frozen=True)
class Generation:
    """Greedy continuations of a batch.

    Attributes:
        tokens: Per row, the new token ids (prompt excluded).
        text: Per row, the decoded new tokens (special tokens dropped).
    """

    tokens: tuple[Int[Tensor, " new"], ...]
    text: tuple[str, ...]


class HookedVLM:
    """A bridge-style vision LLM with named hooks on every stage.

    Build one with :meth:`from_pretrained`. Attributes: ``hf_model`` (the Hugging Face
    module, hooked in place), ``bridge`` (the TransformerLens bridge), ``processor``,
    ``adapter`` (the family adapter), ``name``.
    """

    _layer_cache_problem: Optional[str]  # set on first use by vlens._compat.layer_cache_problem

    def __init__(
        self,
        hf_model: torch.nn.Module,
        processor: Any,
        adapter: VisionPrefixAdapter,
        bridge: TransformerBridge,
        name: str,
    ) -> None:
        self.hf_model = hf_model
        self.processor = processor
        self.adapter = adapter
        self.bridge = bridge
        self.name = name
        self.hook_index = HookIndex.from_bridge(bridge.hook_dict)

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, os.PathLike],
        *,
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
        device_map: Union[None, str, dict] = None,
        process_weights: bool = False,
    ) -> "HookedVLM":
        """Load a checkpoint and wrap it.

        Args:
            name_or_path: A local folder written by ``save_pretrained``, a hub id, or
                ``"toy"`` (the small trained model vlens ships).
            device: Where to put the model (default: cuda when available, else cpu).
                Mutually exclusive with ``device_map``.
            dtype: float32 (default), float16 or bfloat16. Analyses compute in float32
                whatever the model runs in.
            device_map: Passed to Hugging Face, to spread a large model over devices.
            process_weights: Apply HookedTransformer-style weight processing (folded
                LayerNorm, centred weights). Off by default: it changes residual-stream
                values, and so cosine similarities. Logits are unchanged up to a shift.
        """
        from vlens.errors import DeviceError

        if device is not None and device_map is not None:
            raise DeviceError(f"pass either device ({device!r}) or device_map ({device_map!r}), not both")
        source = resolve_checkpoint(name_or_path)
        torch_dtype = resolve_dtype(dtype)
        torch_device = None if device_map is not None else resolve_device(device)
        config = load_config(source)
        adapter_cls = adapter_for(config)
        adapter_cls.check_config(config)
        processor = load_processor(source, adapter_cls.video_processor_class)
        adapter = adapter_cls(config, processor)
        hf_model = load_hf_model(adapter_cls.hf_model_class(), source, torch_dtype, torch_device, device_map)
        bridge = build_bridge_from_module(
            hf_model,
            adapter_cls.tl_architecture,
            hf_config=hf_model.config,
            tokenizer=processor.tokenizer,
            dtype=torch_dtype,
            device=torch_device,
            model_name=os.fspath(name_or_path),
            post_adapter_hook=adapter.tl_adapter_overlay,
        )
        if process_weights:
            bridge.enable_compatibility_mode()
        route_layer_cache(bridge)
        return cls(hf_model, processor, adapter, bridge, name=os.fspath(name_or_path))

    def __repr__(self) -> str:
        stages = self.adapter.stage_prefixes
        per_stage = {stage: len(self.hook_names(stage)) for stage in stages}
        hooks = ", ".join(f"{stage} {n}" for stage, n in per_stage.items())
        try:
            grid = self.adapter.scene_geometry().token_grid
        except UnsupportedArchitectureError:  # a processor whose scene geometry vlens refuses: a repr never raises
            grid = None
        image = "" if grid is None else f", {grid[0] * grid[1]} image tokens for a {grid[0]}x{grid[1]} grid image"
        return (
            f"HookedVLM({self.name!r}: {self.adapter.family}, {self.n_layers} layers, d_model {self.cfg.d_model}"
            f"{image}, {str(self.dtype).removeprefix('torch.')} on {self.device}; hooks: {hooks})"
        )

    # ---- properties -----------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        """The bridge's TransformerLens config (n_layers, d_model, n_heads, d_vocab, ...)."""
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        """The device inputs go to (that of the input embeddings)."""
        return tensor(input_embeddings(self.hf_model), "weight").device

    @property
    def dtype(self) -> torch.dtype:
        return tensor(input_embeddings(self.hf_model), "weight").dtype

    # ---- the language model's own read-out, for lenses ---------------------------------

    def final_norm(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The language model's final norm, as the HF module computes it (no hooks fire)."""
        return self.bridge.ln_final.original_component(resid)

    def unembed(self, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """The unembedding (``lm_head``) applied to normed residuals (no hooks fire)."""
        return self.bridge.unembed.original_component(normed)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding matrix of the language model."""
        return tensor(input_embeddings(self.hf_model), "weight")

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding matrix (transposed ``lm_head.weight``)."""
        head = output_embeddings(self.hf_model)
        assert head is not None  # every family's language model has an lm_head (the bridge unembeds with it)
        return tensor(head, "weight").T

    def hook_names(self, stage: Optional[str] = None) -> list[str]:
        """Canonical hook names, optionally of one stage (vision, connector, language, ...)."""
        names = list(self.hook_index.points)
        if stage is None:
            return names
        stages = self.adapter.stage_prefixes
        if stage not in stages:
            raise HookNameError(f"unknown stage {stage!r}; this model has stages {sorted(stages)}")
        return [n for n in names if stage_of(n, stages) == stage]

    # ---- inputs ---------------------------------------------------------------------

    def prepare(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        answer: Union[None, str, Sequence[Optional[str]]] = None,
        chat_template: bool = True,
    ) -> VLMInputs:
        """Turn images and prompts (and answers) into a model-ready batch with its layout.

        A single example is an image (or a list of images for a multi-image prompt) and a
        prompt string; a batch is a list of those and a list of prompts of the same
        length. The batch is right-padded so every real token keeps the position it has
        when its example runs alone.

        Args:
            images: PIL images, paths, numpy ``H x W x C`` uint8 arrays or torch
                ``C x H x W`` tensors (converted to RGB).
            prompts: The user's text; the chat template wraps it unless
                ``chat_template=False``, in which case it must hold one image
                placeholder per image.
            answer: Text the model should produce after the prompt (for losses and
                answer-token analyses); one per example in a batch, None for none.
            chat_template: Wrap the prompt in the processor's chat template.
        """
        inputs = prepare_batch(self.adapter, images, prompts, answer, chat_template)
        if self.adapter.layout_needs_model:
            inputs = dataclasses.replace(inputs, layout=self.adapter.enrich_layout(self, inputs))
        return inputs

    def _model_kwargs(self, inputs: VLMInputs) -> dict[str, Any]:
        if not isinstance(inputs, VLMInputs):
            raise TypeError(f"expected VLMInputs from model.prepare(...), got {type(inputs).__name__}")
        return inputs.to(self.device, dtype=self.dtype).model_kwargs()

    # ---- running --------------------------------------------------------------------

    def forward(self, inputs: VLMInputs, **unexpected: Any) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the whole batch, exactly as the Hugging Face model computes them.

        Args:
            inputs: From :meth:`prepare`.

        Raises:
            TypeError: For any other argument, naming it. Extra keyword arguments once went
                on to the Hugging Face forward unchecked, so a misspelt one ran silently.
                Hugging Face's own arguments are for ``model.hf_model(...)``, and a language-model
                forward with a key/value cache is :meth:`run_language_model`.
        """
        if unexpected:
            # Collected only to be refused: Python's own message would not say what forward accepts.
            raise TypeError(
                f"HookedVLM.forward() got unexpected keyword argument(s) {', '.join(map(repr, unexpected))}; "
                "it accepts only 'inputs' (from model.prepare(...)). Hugging Face arguments such as "
                "past_key_values belong to model.hf_model(...) or model.run_language_model(...)"
            )
        return self.hf_model(**self._model_kwargs(inputs)).logits

    __call__ = forward

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()) -> Iterator["HookedVLM"]:
        """Attach hooks for the duration of a ``with`` block.

        Each hook is ``(name_or_filter, fn)``: a hook name, glob, or predicate, and a
        function ``fn(tensor, hook)`` that returns a replacement tensor or None.
        """
        level = next(_hook_levels)
        attached = []
        try:
            directions: tuple[tuple[Literal["fwd", "bwd"], Sequence[HookSpec]], ...] = (
                ("fwd", fwd_hooks),
                ("bwd", bwd_hooks),
            )
            for direction, specs in directions:
                for selector, fn in specs:
                    if not callable(fn):
                        raise HookNameError(f"hook for {selector!r} is {fn!r}, not a callable fn(tensor, hook)")
                    for name in self.hook_index.resolve(selector):
                        point = self.hook_index.points[name]
                        alias = None if point.name == name else [name]
                        point.add_hook(fn, dir=direction, level=level, alias_names=alias)
                        attached.append(point)
            yield self
        finally:
            for point in attached:
                point.remove_hooks("both", including_permanent=False, level=level)

    def run_with_hooks(
        self,
        inputs: VLMInputs,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Forward with temporary hooks; see :meth:`hooks` for their form."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self.forward(inputs)

    def run_with_cache(
        self,
        inputs: VLMInputs,
        names_filter: NamesFilter = None,
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], VLMCache]:
        """Forward and cache activations by hook name.

        Args:
            inputs: From :meth:`prepare`.
            names_filter: None (everything), a hook name, a glob such as
                ``"blocks.*.hook_resid_post"``, a list of names and globs, or a
                predicate on names. Unknown names raise ``HookNameError`` listing the
                closest real ones.
            device: Where to put cached tensors (default: where they were computed).
            dtype: Store floating activations in this dtype (default: as computed), e.g.
                float16 to keep a large cache in half the memory; integer ones (token ids)
                are kept as they are.

        Returns:
            Logits and a ``VLMCache`` holding each activation once (aliases of a
            stored tensor resolve to it), with the batch's layout.

        Raises:
            HookNameError: if a hook named explicitly (not through a glob or a
                predicate) does not fire for this model.
        """
        names = self.hook_index.resolve(names_filter)
        store: dict[str, Tensor] = {}
        same_as: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        cache_device = None if device is None else resolve_device(device)
        cache_dtype = None if dtype is None else resolve_dtype(dtype)

        def make_hook(name: str) -> HookFn:
            def save(value: Any, hook: Any) -> None:
                tensor = hooked_tensor(value)
                if tensor is None:
                    return None
                # Module boundaries hand the same tensor from one hook point to the next
                # (hook_out of one component is hook_in of the next): store it once.
                key = (
                    tensor.untyped_storage().data_ptr(),
                    tensor.storage_offset(),
                    tuple(tensor.shape),
                    tuple(tensor.stride()),
                    tensor.dtype,
                )
                first = seen.setdefault(key, name)
                if first != name:
                    same_as[name] = first
                    store.pop(name, None)
                    return None
                stored = tensor.detach()
                if cache_dtype is not None and stored.is_floating_point():
                    stored = stored.to(cache_dtype)
                store[name] = stored if cache_device is None else stored.to(cache_device)
                return None

            return save

        with self.hooks([(name, make_hook(name)) for name in names]):
            logits = self.forward(inputs)
        unfired = tuple(n for n in names if n not in store and n not in same_as)
        explicit = self._explicit_names(names_filter)
        missing = [n for n in explicit if self.hook_index.canonical(n) in unfired]
        if missing:
            raise HookNameError(
                f"hook(s) {missing} exist on this model but never fire in its forward pass "
                "(TransformerLens registers them for architectures that call them); pick another hook"
            )
        aliases = dict(same_as)
        for alias, canonical in self.hook_index.aliases.items():
            if canonical in store or canonical in same_as:
                aliases[alias] = same_as.get(canonical, canonical)
        return logits, VLMCache(store, self.bridge, inputs.layout, aliases=aliases, unfired=unfired)

    @staticmethod
    def _explicit_names(names_filter: NamesFilter) -> list[str]:
        if isinstance(names_filter, str):
            items = [names_filter]
        elif isinstance(names_filter, (list, tuple)):
            items = list(names_filter)
        else:
            return []
        return [n for n in items if not (set("*?[") & set(n))]

    # ---- the language model on embeddings -------------------------------------------

    def input_embeddings(self, inputs: VLMInputs) -> LanguageModelInputs:
        """What the language model receives in this batch's forward pass, to re-run it alone.

        Runs the vision stack and the language model's preamble, and stops before its first
        layer. The embeddings are the text-token embeddings with the image features in place
        of the placeholders (Hugging Face's merged ``inputs_embeds``); the positions are the
        ones the model computed for itself, read where the adapter states
        (``adapter.positions_source``); the extras are the family's per-token inputs. Feed
        them (or a subset of their positions, with ``adapter.positions_after_removal``) to
        :meth:`run_language_model`.
        """
        adapter = self.adapter
        module = adapter.language_model(self.hf_model)
        source = adapter.positions_source(self.hf_model)
        captured: dict[str, Tensor] = {}

        def grab_embeds(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise RuntimeError(
                    f"{type(_module).__name__} was called without inputs_embeds; the {adapter.family} "
                    "adapter must override language_model() to name the module that receives them"
                )
            captured["embeds"] = embeds.detach()

        def grab_positions(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["positions"] = adapter.read_positions(args, kwargs, inputs.batch_size).detach()
            raise _StopForward  # the layers themselves are not needed

        handles = [
            module.register_forward_pre_hook(grab_embeds, with_kwargs=True),
            source.register_forward_pre_hook(grab_positions, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                self.forward(inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "embeds" not in captured or "positions" not in captured:
            raise RuntimeError(
                f"the language model ({type(module).__name__}) never reached {type(source).__name__}, where the "
                f"{adapter.family} adapter reads its positions, in the forward pass"
            )
        embeds = captured["embeds"]
        return LanguageModelInputs(
            embeds=embeds,
            position_ids=captured["positions"].to(embeds.device),
            attention_mask=inputs.attention_mask.to(embeds.device),
            extras={name: inputs.extras[name].to(embeds.device) for name in adapter.per_token_inputs},
        )

    def run_language_model(
        self,
        inputs_embeds: Float[Tensor, "batch pos d_model"],
        position_ids: Int[Tensor, "batch *axes pos"],
        attention_mask: Optional[Int[Tensor, "batch kv_pos"]] = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: Optional[Int[Tensor, " keep"]] = None,
        extras: Optional[dict[str, Tensor]] = None,
    ) -> tuple[Float[Tensor, "batch keep d_vocab"], Any]:
        """Run the language model alone on given input embeddings (hooks fire as usual).

        Args:
            inputs_embeds: E.g. a subset of :meth:`input_embeddings`' positions.
            position_ids: Position of each new token, from the family contract: the
                positions :meth:`input_embeddings` returns, those
                ``adapter.positions_after_removal`` gives a shortened row (or their suffix
                after a cache), or ``adapter.text_positions`` for plain text. Required:
                vlens never lets the model number a subset itself.
            attention_mask: 1 for keys to attend to, 0 for keys to hide, over the cached
                positions followed by the new ones (``[batch, past + pos]``).
            past_key_values: A Hugging Face cache of earlier positions.
            use_cache: Return the updated cache.
            logits_to_keep: Indices of the positions whose logits to compute (default all).
            extras: The family's per-token inputs (``adapter.per_token_inputs``) for these
                positions.

        Returns:
            The logits and the key/value cache (None unless ``use_cache``).
        """
        if position_ids is None:
            raise TypeError(
                "run_language_model needs position_ids: take them from model.input_embeddings(inputs).position_ids "
                "or model.adapter.positions_after_removal / text_positions"
            )
        return self.adapter.run_language_model(
            self.hf_model,
            inputs_embeds.to(self.dtype),
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            logits_to_keep,
            extras,
        )

    # ---- generation -----------------------------------------------------------------

    def generate(
        self,
        inputs: VLMInputs,
        max_new_tokens: int = 20,
        fwd_hooks: Sequence[HookSpec] = (),
    ) -> Generation:
        """Greedy generation from each row's prompt (its answer, if any, is ignored).

        Token for token what the Hugging Face model's ``generate(do_sample=False)``
        produces, with its key/value cache. Rows run one at a time, so a batch gives
        exactly the continuations its examples give alone. ``fwd_hooks`` stay attached
        for every step.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        problem = layer_cache_problem(self)
        if problem is not None:
            # Hugging Face's generate would run on regardless and return wrong tokens after the
            # first one: refuse instead of answering wrongly.
            raise RuntimeError(
                f"cannot generate: {problem}. Cached decoding would be wrong after the first token; "
                "install dependency versions vlens was tested on (see the README)"
            )
        tokens: list[Tensor] = []
        texts: list[str] = []
        with self.hooks(fwd_hooks):
            for row in range(inputs.batch_size):
                single = prepare_batch(
                    self.adapter, [list(inputs.images[row])], [inputs.texts[row]], None, chat_template=False
                )
                kwargs = self._model_kwargs(single)
                prompt_len = kwargs["input_ids"].shape[1]
                with torch.no_grad():
                    out = hf_generate(
                        self.hf_model,
                        **kwargs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=self._pad_token_id(),
                    )
                new = out[0, prompt_len:].cpu()
                tokens.append(new)
                texts.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return Generation(tokens=tuple(tokens), text=tuple(texts))

    def _pad_token_id(self) -> Optional[int]:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---- tokens as strings ----------------------------------------------------------

    def to_str_tokens(self, inputs: VLMInputs, row: Optional[int] = None) -> list[str]:
        """The tokens of one row as strings; image tokens read ``<img r,c>`` (or ``<q k>``).

        ``row`` may be omitted for a single-example batch.
        """
        if row is None:
            if inputs.batch_size != 1:
                raise ValueError(f"inputs hold {inputs.batch_size} rows; pass row= (0..{inputs.batch_size - 1})")
            row = 0
        if not 0 <= row < inputs.batch_size:
            raise ValueError(f"row {row} is out of range for a batch of {inputs.batch_size}")
        ids = inputs.input_ids[row].tolist()
        pieces = [self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
        return inputs.layout.token_labels(row, pieces)
