"""Sizes and schedules of the toy model and its recipe, and the model builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

Scale = Literal["tiny", "full"]


@dataclass(frozen=True)
class Architecture:
    """Shapes of the three towers.

    The vision tower reads ``image_size`` px images in ``patch_size`` px patches, so the language
    model sees ``(image_size // patch_size) ** 2`` visual tokens.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_width: int = 96
    text_layers: int = 8
    text_heads: int = 4
    text_mlp: int = 256

    @property
    def grid(self) -> int:
        """Side of the visual-token grid."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class StageSchedule:
    """Optimisation schedule of one stage: steps, batch size, peak learning rate."""

    steps: int
    batch_size: int
    lr: float
    warmup: float = 0.05  # fraction of steps with a linear warm-up; cosine decay afterwards


@dataclass(frozen=True)
class RecipeConfig:
    """Everything the recipe needs besides the seed.

    Attributes:
        arch: Model shapes.
        pool_size: Training scenes generated once and shared by all stages (the vision tower
            sees their images, the language model their texts).
        eval_size: Held-out scenes used for the end-of-recipe evaluation.
        vision: Stage (a), vision pre-training on per-patch labels.
        text: Stage (b), language-model pre-training on text-only scene dialogues.
        align: Stage (c), projector only, on captions.
        instruct: Stage (d), projector + language model, on question/answer pairs.
        caption_fraction: Share of stage-(d) examples that are captions (keeps captioning alive).
        object_patch_weight: Stage-(a) loss weight of object patches relative to background ones.
        text_loss_on: Stage-(b) supervision, ``"answer"`` or ``"all"`` tokens.
        packed: Stages (b) and (d) train on every question about a scene at once
            (`training_questions`), each in its own branch after the shared image or description
            (`Encoder.pack`); their batch sizes then count scenes, and ``caption_fraction`` is
            unused.
        check_every: Held-out checks every this many steps of stages (c) and (d), recorded in
            the training report as learning curves (0: none). They use no training data or
            randomness, so they do not change the weights.
    """

    arch: Architecture
    pool_size: int
    eval_size: int
    vision: StageSchedule
    text: StageSchedule
    align: StageSchedule
    instruct: StageSchedule
    caption_fraction: float = 1 / 6
    object_patch_weight: float = 4.0
    text_loss_on: str = "answer"
    check_every: int = 500
    packed: bool = True


def recipe_config(scale: Scale) -> RecipeConfig:
    """The two preset configurations: ``"full"`` (the shipped model) and ``"tiny"`` (smoke test)."""
    if scale == "full":
        return RecipeConfig(
            arch=Architecture(),
            pool_size=16_000,
            eval_size=300,
            vision=StageSchedule(steps=1000, batch_size=64, lr=2e-3),
            text=StageSchedule(steps=1000, batch_size=16, lr=2e-3),  # scenes, ~10 questions each
            align=StageSchedule(steps=300, batch_size=48, lr=1e-3),
            instruct=StageSchedule(steps=3000, batch_size=16, lr=1.5e-3),  # images, ~10 questions each
        )
    if scale == "tiny":
        return RecipeConfig(
            arch=Architecture(
                vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                text_width=32, text_layers=2, text_heads=2, text_mlp=64,
            ),
            pool_size=24,
            eval_size=6,
            vision=StageSchedule(steps=3, batch_size=4, lr=1e-3),
            text=StageSchedule(steps=3, batch_size=4, lr=1e-3),
            align=StageSchedule(steps=3, batch_size=4, lr=1e-3),
            instruct=StageSchedule(steps=3, batch_size=4, lr=1e-3),
            check_every=2,
        )
    raise ValueError(f"unknown scale {scale!r}; expected 'tiny' or 'full'")


def build_model(arch: Architecture, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA model (CLIP vision tower, MLP projector, Llama LM).

    The projector reads the last vision layer (``vision_feature_layer=-1``) because stage (a)
    trains exactly that layer's patch states; the CLS token is dropped ("default" strategy).
    """
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_width,
        intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        projection_dim=arch.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_width,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,  # the field image_token_id aliases (attribute_map)
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=arch.grid * arch.grid,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=40,
    )
    return model

