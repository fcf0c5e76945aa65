"""The four stages of the bridge-style recipe.

(a) `train_vision`: the CLIP tower alone, on images only, with per-patch heads predicting the
    colour, shape, size and cell of the object under each patch and a whole-image count head.
    The labels come from the generator's pixel masks, never from text.
(b) `train_text`: the Llama model alone, on text-only dialogues in the chat format, where the
    image is replaced by a description in words ("there is a small red circle at top left .").
(c) `train_multimodal(..., train_lm=False)`: the projector alone, both towers frozen, on captions.
(d) `train_multimodal(..., train_lm=True)`: projector and language model, on question/answer pairs
    (with ``packed``, every question about a scene in one example: `Encoder.pack`).

The vision tower is frozen after (a), so (c) and (d) read cached vision states
(`vision_states`) and splice the projected states into the placeholder positions exactly as
`LlavaModel.forward` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedConfig

from vlens.zoo.config import StageSchedule
from vlens.zoo.examples import (
    N_COUNTS,
    PATCH_HEADS,
    Batch,
    Encoder,
    Packed,
    ScenePool,
    describe,
    sample_qa,
    training_questions,
)


@dataclass(frozen=True)
class StageResult:
    """Outcome of one stage: its name, wall time, smoothed loss at the start and the end, and
    the held-out checks made during the stage (``(step, scores)``; their time is excluded)."""

    name: str
    seconds: float
    first_loss: float
    final_loss: float
    checks: tuple[tuple[int, dict[str, float]], ...] = ()


class VisionHeads(nn.Module):
    """Linear read-outs used only in stage (a); they are not part of the checkpoint."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.patch = nn.ModuleDict({k: nn.Linear(width, n) for k, n in PATCH_HEADS.items()})
        self.count = nn.Linear(width, N_COUNTS)

    def forward(self, states: Float[Tensor, "batch patches width"]) -> dict[str, Tensor]:
        h = self.norm(states)
        out = {k: head(h) for k, head in self.patch.items()}
        out["count"] = self.count(h.mean(dim=1))
        return out


def patch_states(model: LlavaForConditionalGeneration, pixels: Tensor) -> Tensor:
    """The vision states the projector reads: layer ``vision_feature_layer``, CLS dropped."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _run(
    name: str,
    params: Iterable[nn.Parameter],
    schedule: StageSchedule,
    loss_at: Callable[[int], Tensor],
    progress: bool,
    check: Callable[[], dict[str, float]] | None = None,
    check_every: int = 0,
) -> StageResult:
    """AdamW with linear warm-up and cosine decay to 10%; gradient norm clipped at 1.

    With ``check``, it is called every ``check_every`` steps (not after the last one) to record
    the learning curve; the time it takes is not counted in the stage's seconds.
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, int(schedule.warmup * schedule.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, schedule.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start = time.perf_counter()
    ema = first = float("nan")
    checks: list[tuple[int, dict[str, float]]] = []
    paused = 0.0
    bar = tqdm(range(schedule.steps), desc=name, disable=not progress, dynamic_ncols=True)
    for step in bar:
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        value = loss.item()
        ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
        if step == min(9, schedule.steps - 1):
            first = ema
        bar.set_postfix(loss=f"{ema:.4f}")
        if check is not None and check_every and (step + 1) % check_every == 0 and step + 1 < schedule.steps:
            t = time.perf_counter()
            checks.append((step + 1, check()))
            paused += time.perf_counter() - t
    bar.close()
    return StageResult(name, time.perf_counter() - start - paused, first, ema, tuple(checks))


def _set_trainable(model: nn.Module, trainable: list[nn.Module]) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)
    return [p for m in trainable for p in m.parameters()]


def train_vision(
    model: LlavaForConditionalGeneration,
    pool: ScenePool,
    schedule: StageSchedule,
    rng: np.random.Generator,
    object_patch_weight: float = 1.0,
    progress: bool = True,
) -> tuple[StageResult, VisionHeads]:
    """Stage (a): the vision tower on per-patch and count labels (images only).

    Returns:
        The stage result and the trained heads (for `vision_patch_accuracy`; not shipped).
    """
    tower = model.model.vision_tower
    # LlavaConfig types vision_config as dict | config | None; its __post_init__ makes it a config.
    heads = VisionHeads(cast(PreTrainedConfig, model.config.vision_config).hidden_size)
    params = _set_trainable(model, [tower]) + list(heads.parameters())
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    def loss_at(step: int) -> Tensor:
        idx = torch.from_numpy(rng.integers(len(pool), size=schedule.batch_size))
        out = heads(patch_states(model, pool.pixels[idx]))
        # Most patches are background and easy; up-weighting object patches puts the gradient
        # on the hard part, per-patch shape (the prototype's bottleneck).
        on_object = (pool.patch_labels["colour"][idx] > 0).flatten().float()
        weight = 1 + (object_patch_weight - 1) * on_object
        loss = loss_fn(out["count"], pool.counts[idx]).mean()
        for k in PATCH_HEADS:
            per_patch = loss_fn(out[k].flatten(0, 1), pool.patch_labels[k][idx].flatten())
            loss = loss + (per_patch * weight).sum() / weight.sum()
        return loss

    return _run("a: vision", params, schedule, loss_at, progress), heads


@torch.no_grad()
def vision_patch_accuracy(
    model: LlavaForConditionalGeneration, heads: VisionHeads, pool: ScenePool
) -> dict[str, float]:
    """Stage-(a) head accuracy on ``pool``, over object patches only (background excluded)."""
    correct = {k: 0 for k in PATCH_HEADS}
    total, count_ok = 0, 0
    for lo in range(0, len(pool), 256):
        out = heads(patch_states(model, pool.pixels[lo : lo + 256]))
        obj = pool.patch_labels["colour"][lo : lo + 256] > 0
        total += int(obj.sum())
        for k in PATCH_HEADS:
            hit = out[k].argmax(-1) == pool.patch_labels[k][lo : lo + 256]
            correct[k] += int((hit & obj).sum())
        count_ok += int((out["count"].argmax(-1) == pool.counts[lo : lo + 256]).sum())
    acc = {f"patch_{k}": c / max(1, total) for k, c in correct.items()}
    acc["count"] = count_ok / len(pool)
    return acc


def text_example(encoder: Encoder, pool: ScenePool, index: int, rng: np.random.Generator,
                 caption_fraction: float, loss_on: str = "answer") -> tuple[list[int], list[bool]]:
    """A text-only dialogue: the scene in words, then one question."""
    scene = pool.scenes[index]
    qa = sample_qa(scene, rng, caption_fraction)
    text = describe(scene, rng) + " " + qa.question
    return encoder.encode(text, qa.answer, with_image=False, loss_on=loss_on)


def packed_text_example(encoder: Encoder, pool: ScenePool, index: int,
                        rng: np.random.Generator) -> Packed:
    """A scene described in words once, then every question about it (`training_questions`),
    each in its own branch (see `Encoder.pack`)."""
    scene = pool.scenes[index]
    context = describe(scene, rng)
    return encoder.pack([encoder.encode(context + " " + qa.question, qa.answer, with_image=False)
                         for qa in training_questions(scene)])


def packed_image_example(encoder: Encoder, pool: ScenePool, index: int) -> Packed:
    """An image once, then every question about its scene (`training_questions`), each in its
    own branch (see `Encoder.pack`)."""
    return encoder.pack([encoder.encode(qa.question, qa.answer, with_image=True)
                         for qa in training_questions(pool.scenes[index])])


def train_text(
    model: LlavaForConditionalGeneration,
    pool: ScenePool,
    encoder: Encoder,
    schedule: StageSchedule,
    rng: np.random.Generator,
    caption_fraction: float,
    loss_on: str = "answer",
    progress: bool = True,
    packed: bool = False,
) -> StageResult:
    """Stage (b): the language model on text-only scene dialogues.

    With ``loss_on="answer"`` only the answers are supervised: the descriptions list objects in
    random order, so predicting them teaches little, and a pilot run with the loss on every
    token left the model near chance on text-only questions. With ``packed``, each example is
    one scene with all its questions (`packed_text_example`; ``caption_fraction`` and
    ``loss_on`` unused) and ``schedule.batch_size`` counts scenes.
    """
    params = _set_trainable(model, [model.model.language_model, model.lm_head])

    def loss_at(step: int) -> Tensor:
        idx = rng.integers(len(pool), size=schedule.batch_size)
        if packed:
            batch = encoder.collate_packed([packed_text_example(encoder, pool, int(i), rng) for i in idx])
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
            return answer_loss(logits, batch.labels)
        batch = encoder.collate(
            [text_example(encoder, pool, int(i), rng, caption_fraction, loss_on) for i in idx]
        )
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss

    return _run("b: text", params, schedule, loss_at, progress)


@torch.no_grad()
def vision_states(
    model: LlavaForConditionalGeneration, pixels: Tensor, batch_size: int = 256
) -> Float[Tensor, "n patches width"]:
    """Frozen vision states of every image (the projector's input), computed once."""
    return torch.cat(
        [patch_states(model, pixels[lo : lo + batch_size]) for lo in range(0, len(pixels), batch_size)]
    )


def multimodal_logits(
    model: LlavaForConditionalGeneration,
    batch: Batch,
    states: Float[Tensor, "batch patches width"],
    image_token_id: int,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits with projected vision states spliced into the placeholders (as in `LlavaModel`)."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    image = model.model.multi_modal_projector(states).to(embeds.dtype)
    mask = (batch.input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(mask[..., 0].sum()) != image.shape[0] * image.shape[1]:
        raise ValueError("number of image placeholders does not match the number of vision states")
    embeds = embeds.masked_scatter(mask, image)
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).logits


def answer_loss(logits: Tensor, labels: Int[Tensor, "batch pos"]) -> Tensor:
    """Next-token cross-entropy over supervised positions."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )


def train_multimodal(
    model: LlavaForConditionalGeneration,
    pool: ScenePool,
    states: Float[Tensor, "n patches width"],
    encoder: Encoder,
    schedule: StageSchedule,
    rng: np.random.Generator,
    *,
    train_lm: bool,
    caption_fraction: float,
    progress: bool = True,
    check: Callable[[], dict[str, float]] | None = None,
    check_every: int = 0,
    packed: bool = False,
) -> StageResult:
    """Stages (c) (``train_lm=False``: projector only) and (d) (projector + language model).

    Each example is one image and one question; in stage (c) the question is always the caption
    request, in stage (d) a caption request with probability ``caption_fraction``. With
    ``packed`` (stage (d) only), each example is one image with every question of its scene
    and the caption request (`packed_image_example`), and ``schedule.batch_size`` counts images.
    """
    if packed and not train_lm:
        raise ValueError("packed=True is for stage (d) (train_lm=True); stage (c) trains on captions only")
    modules: list[nn.Module] = [model.model.multi_modal_projector]
    if train_lm:
        modules += [model.model.language_model, model.lm_head]
    params = _set_trainable(model, modules)
    fraction = caption_fraction if train_lm else 1.0

    def loss_at(step: int) -> Tensor:
        idx = rng.integers(len(pool), size=schedule.batch_size)
        if packed:
            batch = encoder.collate_packed([packed_image_example(encoder, pool, int(i)) for i in idx])
        else:
            encoded = []
            for i in idx:
                qa = sample_qa(pool.scenes[int(i)], rng, fraction)
                encoded.append(encoder.encode(qa.question, qa.answer, with_image=True))
            batch = encoder.collate(encoded)
        logits = multimodal_logits(model, batch, states[torch.from_numpy(idx)], encoder.image_token_id)
        return answer_loss(logits, batch.labels)

    name = "d: instruct" if train_lm else "c: projector"
    return _run(name, params, schedule, loss_at, progress, check, check_every)
