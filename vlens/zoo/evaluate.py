"""Evaluation of the toy model through the plain Hugging Face path.

- `evaluate_generation`: greedy answers (``model.generate``) on held-out scenes, exact match per
  question type and for captions, next to the always-the-most-common-answer baseline.
- `layer_measurements`: per layer, the logit-lens match rate of object patches (their own colour
  or shape word in the top-5) against a shuffled-label control, and the mean cosine similarity
  between visual-token and text-token hidden states.

Layer index convention: 0 is the input embeddings, l the output of decoder layer l; the last
entry is the raw residual stream (before the final norm), read with a forward hook, because HF's
last ``hidden_states`` entry has the final norm applied.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlens._modules import generate
from vlens.data.scenes import CAPTION_QUESTION, QUESTION_KINDS, Scene
from vlens.zoo.examples import questions_for_eval
from vlens.zoo.processor import prompt_text

KINDS: tuple[str, ...] = QUESTION_KINDS + ("caption",)


@dataclass(frozen=True)
class GenerationScores:
    """Exact-match accuracy of greedy answers.

    Attributes:
        accuracy: Per kind (`KINDS`), the fraction of exactly right answers.
        baseline: Per kind, the accuracy of always giving the most common training answer.
        counts: Per kind, the number of questions asked.
        mistakes: Up to 5 (question, expected, got) examples per kind, for the log.
    """

    accuracy: dict[str, float]
    baseline: dict[str, float]
    counts: dict[str, int]
    mistakes: dict[str, list[tuple[str, str, str]]]


@torch.no_grad()
def greedy_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers through ``model.generate``, decoded without special tokens."""
    answers: list[str] = []
    for lo in range(0, len(questions), batch_size):
        texts = [prompt_text(processor, q) for q in questions[lo : lo + batch_size]]
        inputs = processor(
            images=images[lo : lo + batch_size], text=texts, padding=True, return_tensors="pt"
        )
        out = generate(model, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def majority_answers(train_scenes: list[Scene]) -> dict[str, str]:
    """Most common training answer per kind (presence questions are balanced by construction)."""
    counters: dict[str, Counter] = {k: Counter() for k in KINDS}
    for scene in train_scenes:
        for qa in questions_for_eval(scene):
            counters[qa.kind][qa.answer] += 1
    return {k: c.most_common(1)[0][0] for k, c in counters.items() if c}


def evaluate_generation(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: list[Scene],
    majority: dict[str, str],
) -> GenerationScores:
    """Greedy exact-match accuracy on every question of ``scenes``."""
    model.eval()
    qas = [(s, qa) for s in scenes for qa in questions_for_eval(s)]
    short = [(s, qa) for s, qa in qas if qa.kind != "caption"]
    long = [(s, qa) for s, qa in qas if qa.kind == "caption"]
    got = greedy_answers(model, processor, [s.image for s, _ in short],
                         [qa.question for _, qa in short], max_new_tokens=4)
    got += greedy_answers(model, processor, [s.image for s, _ in long],
                          [qa.question for _, qa in long], max_new_tokens=32)
    right: Counter = Counter()
    base: Counter = Counter()
    total: Counter = Counter()
    mistakes: dict[str, list[tuple[str, str, str]]] = {k: [] for k in KINDS}
    for (_, qa), answer in zip(short + long, got):
        total[qa.kind] += 1
        right[qa.kind] += answer == qa.answer
        base[qa.kind] += majority.get(qa.kind) == qa.answer
        if answer != qa.answer and len(mistakes[qa.kind]) < 5:
            mistakes[qa.kind].append((qa.question, qa.answer, answer))
    return GenerationScores(
        accuracy={k: right[k] / total[k] for k in KINDS if total[k]},
        baseline={k: base[k] / total[k] for k in KINDS if total[k]},
        counts={k: total[k] for k in KINDS if total[k]},
        mistakes=mistakes,
    )


@dataclass(frozen=True)
class LayerMeasurements:
    """Per-layer measurements (index 0 = input embeddings, n_layers + 1 entries).

    Attributes:
        lens_match: Fraction of object patches whose own colour or shape word is in the top-5 of
            the logit lens (final norm + unembedding applied to the patch's hidden state).
        lens_colour: Same, colour word only.
        lens_shape: Same, shape word only.
        lens_control: The same test with object labels shuffled across the object patches.
        cos_visual_text: Mean cosine similarity between visual-token and text-token states.
        cos_text_text: Mean cosine similarity between distinct text-token states (reference).
        n_patches: Number of object patches tested.
    """

    lens_match: Float[Tensor, " layer"]
    lens_colour: Float[Tensor, " layer"]
    lens_shape: Float[Tensor, " layer"]
    lens_control: Float[Tensor, " layer"]
    cos_visual_text: Float[Tensor, " layer"]
    cos_text_text: Float[Tensor, " layer"]
    n_patches: int


def _residual_stream(model: LlavaForConditionalGeneration, inputs: Mapping[str, Any]) -> list[Tensor]:
    """Hidden states per layer, the last one taken before the final norm (see module doc)."""
    captured: list[Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = model.model.language_model.layers[-1].register_forward_hook(hook)
    try:
        out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return list(out.hidden_states[:-1]) + [captured[0]]


@torch.no_grad()
def layer_measurements(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    scenes: list[Scene],
    question: str = CAPTION_QUESTION,
    k: int = 5,
    seed: int = 0,
) -> LayerMeasurements:
    """Logit lens and visual-text cosine similarity per layer, on the prompt ``question``."""
    model.eval()
    vocab = processor.tokenizer.get_vocab()
    image_id, bos_id = processor.image_token_id, processor.tokenizer.bos_token_id
    norm, head = model.model.language_model.norm, model.lm_head
    tops, labels = [], []  # per scene: [layer, patches, k] top ids; [patches, 2] word ids
    cos_vt, cos_tt = [], []
    for scene in scenes:
        inputs = processor(images=scene.image, text=prompt_text(processor, question),
                           return_tensors="pt")
        states = torch.stack([h[0] for h in _residual_stream(model, inputs)])  # [layer, pos, d]
        ids = inputs["input_ids"][0]
        image_pos = (ids == image_id).nonzero().squeeze(-1)
        text_pos = ((ids != image_id) & (ids != bos_id)).nonzero().squeeze(-1)
        owner = torch.from_numpy(scene.patch_labels.reshape(-1))
        obj_patches = (owner >= 0).nonzero().squeeze(-1)
        if len(obj_patches):
            h = states[:, image_pos[obj_patches]]
            tops.append(head(norm(h)).topk(k, dim=-1).indices)
            labels.append(torch.tensor([[vocab[scene.objects[int(o)].colour],
                                         vocab[scene.objects[int(o)].shape]]
                                        for o in owner[obj_patches]]))
        v = torch.nn.functional.normalize(states[:, image_pos], dim=-1)
        t = torch.nn.functional.normalize(states[:, text_pos], dim=-1)
        cos_vt.append((v @ t.transpose(1, 2)).mean(dim=(1, 2)))
        tt = t @ t.transpose(1, 2)
        n = tt.shape[-1]
        cos_tt.append((tt.sum(dim=(1, 2)) - tt.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1)))
    top = torch.cat(tops, dim=1)  # [layer, patches, k]
    lab = torch.cat(labels)  # [patches, 2]
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(lab)))

    def hit_rate(words: Tensor) -> Tensor:
        return (top.unsqueeze(-1) == words[None, :, None, :]).any(dim=2).any(dim=-1).float().mean(-1)

    return LayerMeasurements(
        lens_match=hit_rate(lab),
        lens_colour=hit_rate(lab[:, :1]),
        lens_shape=hit_rate(lab[:, 1:]),
        lens_control=hit_rate(lab[perm]),
        cos_visual_text=torch.stack(cos_vt).mean(0),
        cos_text_text=torch.stack(cos_tt).mean(0),
        n_patches=len(lab),
    )
