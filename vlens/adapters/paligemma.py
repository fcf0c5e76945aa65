"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): a prefix-LM over one grid per image.

A SigLIP tower encodes each image, resized to the tower's square, into its ``p x p`` patch
grid (``p = image_size // patch_size``: 16 x 16 = 256 tokens at 224 px, patch 14); a linear
projector maps every patch into the Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) language
model, in raster order. The processor writes the family's own format::

    <image>*(p*p) per image  <bos> prompt \\n  [answer <eos>]

with no chat template and no markers between images: the images come first, ``<bos>`` and
the prompt after them, and a newline the processor appends closes the prompt. A prompt is
therefore the images followed by the text (vlens writes ``{images}{prompt}``: the generic
``{images}\\n{prompt}`` would add a second newline the model never saw in training).

Prefix-LM: the image and the prompt form the *prefix* (``token_type_ids`` 0), in which every
token attends to every other, later ones included; the answer is the *suffix* (type 1),
causal, attending to the whole prefix and to earlier suffix tokens. The answer must be
given to the processor as its ``suffix`` (it appends ``<eos>``), never appended to the
prompt text, where it would join the bidirectional prefix and its tokens would see the
ones they are meant to predict. Generated tokens are suffix tokens too (Hugging Face's
``generate`` gives them type 1).

Contract: positions are 1-D and start at 1 (``PaliGemmaModel`` numbers a fresh sequence
``1..n``); ``token_type_ids`` are its per-token inputs; the language model is not causal
over the image (an image token's state depends on the prompt after it), so token-removal
analyses run the exact naive engine. A token's box is its patch of the image, squashed to
the tower's square.

TransformerLens 4.3 has no PaliGemma adapter: the one here maps TransformerLens's own Gemma
(or Gemma 2) language-model adapter re-rooted under ``model.language_model``, beside the
SigLIP tower and the projector, and is registered with TransformerLens's factory when this
module is imported.
"""

from __future__ import annotations

from typing import Any, Sequence

import PIL.Image
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import SiglipVisionEncoderBridge, VisionProjectionBridge
from transformer_lens.model_bridge.supported_architectures.gemma1 import Gemma1ArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.gemma2 import Gemma2ArchitectureAdapter
from transformers import BatchFeature

from vlens.adapters._geometry import Frame, cell_boxes, clip_to_image, resized_size
from vlens.adapters.base import VisionPrefixAdapter, expect
from vlens.adapters.contract import SceneGeometry, SequentialPositions
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.layout import ImageSpan, contiguous_runs, grid_span

LANGUAGE_TOWERS: dict[str, type[ArchitectureAdapter]] = {
    "gemma": Gemma1ArchitectureAdapter,  # PaliGemma
    "gemma2": Gemma2ArchitectureAdapter,  # PaliGemma 2
}

FIRST_POSITION = 1
"""``PaliGemmaModel.forward`` numbers a fresh sequence ``arange(n) + 1`` (1-indexed, as
big_vision trained it)."""


class PaliGemmaArchitectureAdapter(ArchitectureAdapter):
    """TransformerLens adapter for ``PaliGemmaForConditionalGeneration``.

    The language tower's mapping depends on the text config (Gemma or Gemma 2), which the
    bridge config does not carry, so it is built in :meth:`prepare_model` (called with the
    loaded model before the bridge is assembled), from TransformerLens's own Gemma adapters.
    """

    applicable_phases: list[int] = []

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self.cfg.attn_implementation = "eager"
        self._extract_vision_dims(cfg)
        self.component_mapping = {}

    def prepare_model(self, hf_model: Any) -> None:
        text_type = hf_model.config.text_config.model_type
        if text_type not in LANGUAGE_TOWERS:
            raise UnsupportedArchitectureError(
                f"PaliGemma with a {text_type!r} language model is not supported: vlens maps {sorted(LANGUAGE_TOWERS)}"
            )
        super().prepare_model(hf_model)
        language = LANGUAGE_TOWERS[text_type](self.cfg)  # sets the tower's norm/rotary/soft-cap flags on self.cfg
        language._reprefix_components("model.", "model.language_model.")
        self.weight_processing_conversions = language.weight_processing_conversions
        self.component_mapping = {
            "vision_encoder": SiglipVisionEncoderBridge(name="model.vision_tower", config=self.cfg),
            "vision_projector": VisionProjectionBridge(name="model.multi_modal_projector"),
            **language.components,
        }


ArchitectureAdapterFactory.register_adapter("PaliGemmaForConditionalGeneration", PaliGemmaArchitectureAdapter)


class PaliGemmaAdapter(SequentialPositions, VisionPrefixAdapter):
    """PaliGemma / PaliGemma 2: SigLIP patches and the prompt as a bidirectional prefix."""

    family = "paligemma"
    hf_architectures = ("PaliGemmaForConditionalGeneration",)
    tl_architecture = "PaliGemmaForConditionalGeneration"
    model_input_names = ("token_type_ids",)
    fallback_template = "{images}{prompt}"
    nested_images = True
    per_token_inputs = ("token_type_ids",)
    causal_over_image = False

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        expect(config, "model_type", ("paligemma",), cls.family)
        expect(
            config.vision_config, "model_type", ("siglip_vision_model",), cls.family, where="config.vision_config",
        )
        expect(config.text_config, "model_type", tuple(LANGUAGE_TOWERS), cls.family, where="config.text_config")

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        ip = getattr(processor, "image_processor", None)
        size = getattr(ip, "size", None)
        hw = (size.get("height"), size.get("width")) if isinstance(size, dict) else (
            getattr(size, "height", None), getattr(size, "width", None))
        tower = config.vision_config.image_size
        if getattr(ip, "do_resize", True) and None not in hw and hw != (tower, tower):
            raise UnsupportedArchitectureError(
                f"paligemma: the image processor resizes images to {hw[0]}x{hw[1]} but the vision tower takes "
                f"{tower}x{tower} (vision_config.image_size); this checkpoint's processor and model disagree"
            )
        if getattr(ip, "do_center_crop", False):
            raise UnsupportedArchitectureError(
                "paligemma: the image processor centre-crops (do_center_crop=True); PaliGemma's processor resizes "
                "the whole image to the tower's square, and vlens maps token boxes for that only"
            )
        n = self.tokens_per_image
        seq = getattr(processor, "image_seq_length", None)
        if seq != n:
            raise UnsupportedArchitectureError(
                f"paligemma: the processor writes {seq!r} image tokens per image (image_seq_length) but the tower "
                f"makes {n} patches ({self.grid_side}x{self.grid_side}); this checkpoint's processor and model disagree"
            )

    # ---- geometry -------------------------------------------------------------------

    @property
    def grid_side(self) -> int:
        """Side of one image's patch grid (the tower's convolution drops a remainder)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid_side**2

    def token_boxes(self, span: ImageSpan, image_size: tuple[int, int]) -> Float[Tensor, "n 4"]:
        width, height = image_size
        ip = self.processor.image_processor
        frame = Frame(float(width), float(height))
        if getattr(ip, "do_resize", False):
            h, w = resized_size(height, width, ip.size, self.family)
            frame = frame.resize(w, h)
        patch = self.config.vision_config.patch_size
        return clip_to_image(frame.to_original(cell_boxes(span.row_col, patch)), width, height)

    def scene_geometry(self) -> SceneGeometry:
        patch, g = self.config.vision_config.patch_size, self.grid_side
        return SceneGeometry(image_size=g * patch, patch_size=patch, token_grid=(g, g))

    # ---- positions: 1-D, from 1 -------------------------------------------------------

    def positions_after_removal(
        self, positions: Int[Tensor, " pos"], keep: Bool[Tensor, " pos"]
    ) -> Int[Tensor, " n"]:
        """The kept tokens numbered ``1..n_kept``, as ``PaliGemmaModel`` numbers the processor's
        own shorter sequence (its suffix ``[c:]`` continues after a reused prefix).

        Raises:
            UnsupportedArchitectureError: if the model did not number the full row 1..n.
        """
        if positions.ndim != 1 or keep.shape != positions.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} and keep {tuple(keep.shape)} must be one row of the same length"
            )
        expected = torch.arange(positions.shape[0], device=positions.device) + FIRST_POSITION
        if not torch.equal(positions.to(expected.dtype), expected):
            raise UnsupportedArchitectureError(
                f"paligemma: the language model numbered this row {positions[:8].tolist()}..., not "
                f"{FIRST_POSITION}..n, so its positions are not the sequence its adapter states"
            )
        return torch.arange(int(keep.sum()), device=positions.device) + FIRST_POSITION

    def text_positions(self, n: int, device: torch.device) -> Int[Tensor, " n"]:
        return torch.arange(n, device=device) + FIRST_POSITION

    # ---- prompt and answer ----------------------------------------------------------

    def format_prompt(self, prompt: str, n_images: int, chat_template: bool) -> str:
        """``<image>`` per image, then the prompt: the processor adds ``<bos>`` after the
        images and the closing ``\\n`` itself. PaliGemma has no chat template, so
        ``chat_template`` only says whether the placeholders may be left out (True: they
        are put in front) or must already lead the prompt (False)."""
        placeholder = self.prompt_placeholder()
        found = prompt.count(placeholder)
        if found and (found != n_images or not prompt.startswith(placeholder * found)):
            raise PromptError(
                f"prompt {prompt!r} has {found} image placeholder(s) {placeholder!r} with {n_images} image(s): "
                f"PaliGemma's images open its prefix, so put exactly {n_images} {placeholder!r} at the very start "
                "of the prompt, or none (vlens puts them there)"
            )
        if not found and not chat_template and n_images:
            raise PromptError(
                f"prompt {prompt!r} has no image placeholder but {n_images} image(s) were given; with "
                f"chat_template=False start the prompt with one {placeholder!r} per image"
            )
        for token in (self.tokenizer.bos_token, self.tokenizer.eos_token):
            if token and token in prompt:
                raise PromptError(
                    f"prompt {prompt!r} contains {token!r}; the PaliGemma processor writes <bos> after the images "
                    "and the answer's <eos> itself, so pass the prompt text alone"
                )
        return prompt if found else self.fallback_template.format(images=placeholder * n_images, prompt=prompt)

    def answer_separator(self, prompt_text: str) -> str:
        # The answer is the processor's suffix, a segment of its own after the prompt's "\n".
        return ""

    def process_full(
        self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str], prompt_texts: Sequence[str]
    ) -> BatchFeature:
        """The prompts with their answers as the processor's ``suffix`` (type 1, ``<eos>``
        appended), never as prompt text, which would put them in the bidirectional prefix.

        A row without an answer gets no suffix: the processor takes a suffix for every row
        or none, so such a row's lone ``<eos>`` is turned into padding, which leaves the row
        exactly as the prompt alone makes it.
        """
        suffixes = []
        for text, prompt in zip(texts, prompt_texts):
            if not text.startswith(prompt):
                raise PromptError(f"the text {text!r} does not start with its prompt {prompt!r}")
            suffixes.append(text[len(prompt):])
        if not any(suffixes):
            return self.process(images, prompt_texts)
        batch = self._run_processor(images, prompt_texts, suffix=suffixes)
        eos = self.tokenizer.eos_token_id
        for row, suffix in enumerate(suffixes):
            if suffix:
                continue
            types = batch["token_type_ids"][row]
            suffix_positions = (types.bool() & batch["attention_mask"][row].bool()).nonzero().flatten().tolist()
            if len(suffix_positions) != 1 or int(batch["input_ids"][row, suffix_positions[0]]) != eos:
                raise UnsupportedArchitectureError(
                    f"paligemma: the processor made an empty suffix into {len(suffix_positions)} token(s), not the "
                    "single <eos> vlens expects; prepare rows with and without answers in separate batches"
                )
            lone = suffix_positions[0]
            batch["input_ids"][row, lone] = self.tokenizer.pad_token_id
            batch["attention_mask"][row, lone] = 0
            batch["token_type_ids"][row, lone] = 0
        return batch

    def process(self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str]) -> BatchFeature:
        return self._run_processor(images, texts)

    def _run_processor(
        self, images: Sequence[Sequence[PIL.Image.Image]], texts: Sequence[str], suffix: Any = None
    ) -> BatchFeature:
        if not all(images):
            raise PromptError(
                "PaliGemma's processor needs at least one image in every row (its prefix starts with the images)"
            )
        tokenizer = self.tokenizer
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            batch = self.processor(
                text=list(texts), images=[list(imgs) for imgs in images], suffix=suffix, return_tensors="pt",
                padding=True,
            )
        finally:
            tokenizer.padding_side = old_side
        batch.pop("labels", None)  # the processor's training labels; vlens's answer mask says the same
        return batch

    def model_extras(self, batch: BatchFeature) -> dict[str, torch.Tensor]:
        if "token_type_ids" not in batch:
            raise UnsupportedArchitectureError(
                "paligemma: the processor returned no token_type_ids; PaliGemma needs them (they make the image and "
                "prompt one bidirectional prefix), so vlens will not run without them"
            )
        return {"token_type_ids": batch["token_type_ids"]}

    def marker_ids(self) -> frozenset[int]:
        # <bos> separates the images from the prompt text in PaliGemma's format.
        return frozenset({int(self.tokenizer.bos_token_id)})

    # ---- layout ---------------------------------------------------------------------

    def image_spans(self, batch: BatchFeature, row: int, positions: torch.Tensor) -> list[ImageSpan]:
        n, g = self.tokens_per_image, self.grid_side
        runs = contiguous_runs(positions)
        if len(runs) != 1 or int(positions[0]) != 0 or positions.numel() % n:
            raise PromptError(
                f"row {row}: its {positions.numel()} image tokens are not one block of whole images ({n} tokens "
                "each) at the start of the row, as PaliGemma's prefix format has them"
            )
        pixel_values = batch.get("pixel_values")
        n_images = positions.numel() // n
        total = sum(
            int(((batch["input_ids"][b] == self.image_token_id) & batch["attention_mask"][b].bool()).sum()) // n
            for b in range(batch["input_ids"].shape[0])
        )
        if pixel_values is None or int(pixel_values.shape[0]) != total:
            raise PromptError(
                f"the batch's image tokens describe {total} images but pixel_values holds "
                f"{None if pixel_values is None else int(pixel_values.shape[0])}"
            )
        return [grid_span(i, positions[i * n : (i + 1) * n], g, g) for i in range(n_images)]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "language_model": self.config.text_config.model_type,
            "attention": "prefix-LM: image + prompt bidirectional (token_type_ids 0), answer causal (1)",
        }
