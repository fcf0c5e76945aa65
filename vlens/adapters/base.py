"""What every vision-prefix family adapter provides, and the logic they share.

A family adapter is the only code that knows a family: its Hugging Face class, the
TransformerLens architecture name its bridge is built with, its image placeholder, its
chat template, the extra tensors its forward takes, how an image becomes tokens
(:meth:`VisionPrefixAdapter.image_spans`), and the facts of the family contract
(``vlens.adapters.contract``: positions, per-token inputs, causality over the image,
token boxes, scene geometry), which this base class refuses to assume. Adding a family
means writing one file with one subclass and listing it in ``vlens/adapters/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import PIL.Image
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import BatchFeature

from vlens._compat import cache_argument, output_cache
from vlens._modules import decoder, output_embeddings
from vlens.adapters.contract import FACTS, SceneGeometry, Unstated, unstated
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, TokenLayout, assemble_layout

if TYPE_CHECKING:
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM


class VisionPrefixAdapter(ABC):
    """Base class of the family adapters.

    Class attributes a subclass sets:
        family: Short name shown to users ("llava", "llava_next", ...).
        hf_architectures: The ``config.architectures`` entries this adapter handles.
        tl_architecture: The TransformerLens adapter name the bridge is built with.
        model_input_names: Processor outputs, besides ``input_ids``,
            ``attention_mask`` and ``pixel_values``, that the HF forward needs.
        fallback_template: Prompt template used when the processor has no chat
            template; ``{images}`` becomes the placeholders, ``{prompt}`` the prompt.
        layout_needs_model: Whether the layout needs a forward of the model's vision
            stack (:meth:`enrich_layout`), e.g. Q-Former query attention maps.
        video_processor_class: See the attribute.
    """

    family: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    tl_architecture: ClassVar[str]
    model_input_names: ClassVar[tuple[str, ...]] = ()
    fallback_template: ClassVar[str] = "{images}\n{prompt}"
    layout_needs_model: ClassVar[bool] = False
    video_processor_class: ClassVar[Optional[str]] = None
    """The transformers processor class of a family whose processor transformers builds only
    with torchvision (one holding a video processor, or one declared torchvision-only like
    Pixtral's); where torchvision cannot be imported, vlens loads that class for images with
    its image processor and tokenizer (``vlens.adapters._processors``)."""
    stage_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("vision_encoder.",),
        "connector": ("vision_projector.",),
        "language": ("embed.", "hook_embed", "rotary_emb.", "blocks.", "ln_final.", "unembed.", "hook_unembed"),
    }

    def __init__(self, config: Any, processor: Any) -> None:
        self.check_config(config)
        self.config = config
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self._image_token_id()
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    # ---- what each family states --------------------------------------------------

    @classmethod
    def hf_model_class(cls) -> type:
        """The transformers class that loads this family's checkpoints."""
        import transformers

        return getattr(transformers, cls.hf_architectures[0])

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ``UnsupportedArchitectureError`` on a config setting the adapter does not handle."""
        archs = getattr(config, "architectures", None) or []
        if archs and archs[0] not in cls.hf_architectures:
            raise UnsupportedArchitectureError(
                f"{cls.__name__} handles {list(cls.hf_architectures)}, not {archs[0]!r}"
            )

    @abstractmethod
    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        """The spans of the images of one row, from the processor's output.

        Args:
            batch: The processor's output for the whole batch.
            row: Batch row.
            positions: The row's image-placeholder positions (ascending).
        """

    def marker_ids(self) -> frozenset[int]:
        """Text tokens that only delimit images (excluded from prefix/instruction masks)."""
        return frozenset()

    def layout_extras(self, batch: BatchFeature) -> dict:
        """Family-specific facts to keep on the layout (e.g. the Q-Former's text)."""
        return {}

    def _image_token_id(self) -> int:
        for source in (self.config, self.processor, self.tokenizer):
            for attr in ("image_token_id", "image_token_index"):
                value = getattr(source, attr, None)
                if isinstance(value, int):
                    return value
        token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        if token is not None:
            return int(self.tokenizer.convert_tokens_to_ids(token))
        raise UnsupportedArchitectureError(
            f"cannot find the image placeholder token of this {self.family} checkpoint: neither its config "
            "nor its processor defines image_token_id / image_token"
        )

    # ---- prompt formatting --------------------------------------------------------

    def format_prompt(self, prompt: str, n_images: int, chat_template: bool) -> str:
        """The text the processor sees for one example.

        With ``chat_template=True`` the prompt is wrapped in the processor's chat
        template (images first unless the prompt places ``<image>`` itself), ending with
        the generation prompt (``ASSISTANT:`` or its family's equivalent). With
        ``chat_template=False`` the prompt is used verbatim and must contain one image
        placeholder per image.
        """
        placeholder = self.prompt_placeholder()
        found = prompt.count(placeholder)
        if not chat_template:
            if found != n_images:
                raise PromptError(
                    f"prompt {prompt!r} has {found} image placeholder(s) {placeholder!r} but {n_images} image(s) "
                    f"were given; with chat_template=False put one {placeholder!r} per image in the prompt"
                )
            return prompt
        if found not in (0, n_images):
            raise PromptError(
                f"prompt {prompt!r} has {found} image placeholder(s) {placeholder!r} but {n_images} image(s) were "
                f"given; use exactly {n_images}, or none to put the images before the prompt"
            )
        if found:
            pieces = prompt.split(placeholder)
            content: list[dict] = []
            for i, piece in enumerate(pieces):
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
                if i < n_images:
                    content.append({"type": "image"})
        else:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.render_chat(messages)
        if found:
            return self.fallback_template.format(images="", prompt=prompt)
        return self.fallback_template.format(images=placeholder * n_images, prompt=prompt)

    def render_chat(self, messages: list[dict]) -> str:
        """The processor's chat template applied to ``messages``, ending with the generation
        prompt. A family whose processor's ``apply_chat_template`` needs a part vlens may load
        without (SmolVLM's reads its video processor) overrides this."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_placeholder(self) -> str:
        """The text that stands for one image in a prompt, before the processor expands it.

        Default: the image token itself (``<image>``). A family whose processor expands a
        different token (Gemma3 writes ``<start_of_image>`` and expands it into
        ``<image_soft_token>`` s) overrides this.
        """
        return self.image_token

    def answer_separator(self, prompt_text: str) -> str:
        """What goes between the generation prompt and the answer text."""
        return "" if prompt_text[-1:].isspace() else " "

    # ---- processing ---------------------------------------------------------------

    def process(self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str]) -> BatchFeature:
        """Run the processor on a batch with right padding (every real token keeps its position)."""
        tokenizer = self.tokenizer
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            flat_images = [list(imgs) for imgs in images]
            kwargs: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True}
            if any(flat_images):
                kwargs["images"] = flat_images if self.nested_images else [im for imgs in flat_images for im in imgs]
            return self.processor(**kwargs)
        finally:
            tokenizer.padding_side = old_side

    def process_full(
        self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str], prompt_texts: Sequence[str]
    ) -> BatchFeature:
        """Process prompts with their answers appended (``texts``); ``prompt_texts`` are the
        prompts alone. Default: ``process(images, texts)``. A family whose connector reads
        text (InstructBLIP's Q-Former) overrides it so the connector reads the prompt only."""
        return self.process(images, texts)

    def enrich_layout(self, model: "HookedVLM", inputs: "VLMInputs") -> TokenLayout:
        """The layout of ``inputs`` completed with facts that need the model (called by
        ``HookedVLM.prepare`` when ``layout_needs_model``). Default: unchanged."""
        return inputs.layout

    nested_images: ClassVar[bool] = False
    """Whether the processor wants images as a list per example (Idefics3) or flat."""

    def build_layout(self, batch: BatchFeature, answer_start: list[int]) -> TokenLayout:
        """The ``TokenLayout`` of a processed batch."""
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        spans = []
        for row in range(input_ids.shape[0]):
            positions = ((input_ids[row] == self.image_token_id) & attention_mask[row].bool()).nonzero().flatten()
            # A text-only row (no image given) has no spans; families read image tensors only for images.
            spans.append(self.image_spans(batch, row, positions) if positions.numel() else [])
        return assemble_layout(
            input_ids,
            attention_mask,
            self.image_token_id,
            spans,
            answer_start,
            marker_ids=self.marker_ids(),
            extras=self.layout_extras(batch),
        )

    def with_token_boxes(
        self, layout: TokenLayout, images: Sequence[Sequence[PIL.Image.Image]]
    ) -> TokenLayout:
        """``layout`` with every span's ``boxes`` (:meth:`token_boxes`) on its row's images."""
        rows = tuple(
            tuple(replace(span, boxes=self.token_boxes(span, images[row][span.image_index].size)) for span in spans)
            for row, spans in enumerate(layout.images)
        )
        return replace(layout, images=rows)

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        """The family's extra forward tensors out of the processor's output."""
        missing = [name for name in self.model_input_names if name not in batch]
        if missing:
            raise UnsupportedArchitectureError(
                f"the {self.family} processor did not return {missing}, which the model's forward needs"
            )
        return {name: batch[name] for name in self.model_input_names}

    # ---- the language model on its own (token removal, gradients) ---------------------

    per_token_inputs = Unstated[tuple[str, ...]](
        "the extras (VLMInputs.extras) its language model reads one value per token, () for none"
    )
    """Extras (``VLMInputs.extras``) the language model reads, one value per token, e.g. token
    types that make an image's tokens attend to each other. Analyses that remove tokens keep
    the entries of the kept positions and pass them to :meth:`run_language_model`."""

    def per_token_values(self, call_kwargs: dict[str, Any], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values of :attr:`per_token_inputs` in one forward pass, ``[batch, pos, ...]`` each.

        Args:
            call_kwargs: The keyword arguments the language model (:meth:`language_model`) was
                called with in that forward pass.
            extras: The batch's ``VLMInputs.extras``.

        Default: the extras of those names. A family whose per-token inputs are computed inside
        the forward (Qwen3-VL's DeepStack features) reads them from the call instead.
        """
        return {name: extras[name] for name in self.per_token_inputs}

    causal_over_image = Unstated[bool](
        "whether each language-model state depends only on earlier positions, image tokens included"
    )
    """Whether a position's language-model state depends only on the positions before it,
    image tokens included: then the key/value cache of a prefix can be reused when later
    tokens change (the token-removal ``kv`` engine relies on it). False for a language model
    whose image tokens attend to later ones (bidirectionally within an image)."""

    def positions_after_removal(
        self, positions: Int[Tensor, "*axes pos"], keep: Bool[Tensor, " pos"]
    ) -> Int[Tensor, "*axes n"]:
        """Position ids of one row with only the ``keep`` positions left, given the positions
        the model gave the full row; ``[n]`` (1-D) or ``[axes, n]`` (multi-axis rotary). Its
        suffix ``[..., c:]`` is what the kept tokens from the c-th on get after a reused prefix."""
        raise unstated(self, "positions_after_removal", "how its language model numbers a shortened sequence")

    def text_positions(self, n: int, device: torch.device) -> Int[Tensor, "*axes n"]:
        """Position ids of ``n`` text tokens with nothing before them."""
        raise unstated(self, "text_positions", "how its language model numbers a text-only sequence")

    def positions_source(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        """The module whose call, in a forward pass, receives the position ids the language
        model computed for itself (:meth:`read_positions` takes them out of the call)."""
        raise unstated(self, "positions_source", "where a forward pass shows the positions its model computed")

    def read_positions(self, args: tuple, kwargs: dict, batch_size: int) -> Int[Tensor, "batch *axes pos"]:
        """The position ids out of a call of :meth:`positions_source`, batch axis first."""
        raise unstated(self, "read_positions", "how to read the positions its model computed")

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        """The pixel box of each token of ``span`` on its input image.

        Args:
            span: One image's span, as :meth:`image_spans` built it.
            image_size: The input image's (width, height) in pixels (PIL's ``size``).

        Returns:
            ``[n, 4]`` boxes (x0, y0, x1, y1) in the input image's pixel coordinates (pixel
            column i covers ``[i, i + 1)``), clipped to the image; NaN rows for tokens that
            cover no region of it (query tokens, separators, a CLS token, padding only).
        """
        raise unstated(self, "token_boxes", "the pixel box of each visual token on the input image")

    def scene_geometry(self) -> SceneGeometry:
        """The size at which synthetic scenes are drawn for this model (``vlens.data``)."""
        raise unstated(self, "scene_geometry", "the size and token grid at which synthetic scenes are drawn")

    @classmethod
    def unstated_facts(cls) -> list[str]:
        """The facts of the contract (``vlens.adapters.contract.FACTS``) this class leaves to
        the base class, which raises for them."""
        missing = []
        for fact in FACTS:
            owner = next(klass for klass in cls.__mro__ if fact in klass.__dict__)
            if owner is VisionPrefixAdapter:
                missing.append(fact)
        return missing

    @property
    def attention_window(self) -> Optional[int]:
        """The sliding attention window of the language model's windowed layers, None when
        every layer attends to the whole sequence (the text config's ``sliding_window``,
        unless ``use_sliding_window`` turns it off)."""
        text_config = self.config.get_text_config()
        window = getattr(text_config, "sliding_window", None)
        return window if window is not None and getattr(text_config, "use_sliding_window", True) else None

    def language_model(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        """The module that receives the merged input embeddings as ``inputs_embeds``."""
        return decoder(hf_model)

    def run_language_model(
        self,
        hf_model: torch.nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        logits_to_keep: Optional[torch.Tensor],
        extras: Optional[dict[str, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (and the new key/value cache) of the language model run on embeddings.

        When a submodule holding :meth:`language_model` has its own output head (a causal LM
        inside the whole model), it runs alone; otherwise the whole model runs with
        ``inputs_embeds`` and no image tensors, as every LLaVA-style class accepts, so
        whatever it does after the decoder (final norm, head, soft-capping) is kept.
        ``position_ids`` come from the contract (``input_embeddings``' positions, or
        :meth:`positions_after_removal`), batch axis first, handed to Hugging Face in its
        layout by :meth:`hf_position_ids`. ``extras`` are
        :attr:`per_token_inputs`, passed through by name.
        """
        causal_lm = self._causal_lm(hf_model)
        kwargs: dict[str, Any] = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "position_ids": self.hf_position_ids(position_ids),
            cache_argument(causal_lm): past_key_values,
            "use_cache": use_cache,
            **(extras or {}),
        }
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep
        out = causal_lm(**kwargs)
        return out.logits, output_cache(out)

    def hf_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``position_ids`` as the contract gives them (batch axis first) in the layout the
        Hugging Face forward takes. Default: unchanged; a multi-axis family whose forward wants
        the axes first overrides this."""
        return position_ids

    def _causal_lm(self, hf_model: torch.nn.Module) -> torch.nn.Module:
        """The outermost submodule holding the decoder that has its own output head
        (BLIP-2's ``OPTForCausalLM``), or the whole model when none has."""
        decoder = self.language_model(hf_model)
        module = hf_model
        while module is not decoder:
            child = next((c for c in module.children() if any(m is decoder for m in c.modules())), None)
            if child is None:
                break
            head = output_embeddings(child) if hasattr(child, "get_output_embeddings") else None
            if head is not None:
                return child
            module = child
        return hf_model

    def tl_adapter_overlay(self, tl_adapter: Any) -> None:
        """Edit the TransformerLens adapter of this model's bridge before the bridge is built
        (``build_bridge_from_module``'s ``post_adapter_hook``), e.g. to map a vision tower
        TransformerLens leaves opaque. Default: nothing. It edits that one adapter object,
        never TransformerLens's registry."""

    def describe(self) -> dict[str, Any]:
        """A short summary for ``vlens info``."""
        return {"family": self.family, "image_token": self.image_token, "image_token_id": self.image_token_id}


def expect(config: Any, attr: str, allowed: Sequence[Any], family: str, where: str = "config") -> None:
    """Refuse a config value the adapter does not understand (penzai-style strictness).

    ``where`` names the (sub-)config in the message, e.g. ``"config.text_config"``.
    """
    value = getattr(config, attr, None)
    if value not in allowed:
        raise UnsupportedArchitectureError(
            f"{family}: {where}.{attr} = {value!r} is not supported; vlens handles {list(allowed)}"
        )


