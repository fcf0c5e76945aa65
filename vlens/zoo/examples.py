"""Training examples of the recipe: the scene pool, per-patch labels and text encodings.

Text goes through the processor's own chat template, and ``<image>`` is expanded exactly as
`LlavaProcessor` does (one placeholder per patch), so the ids match
``processor(images=image, text=prompt + " " + answer + " </s>")``; `tests/unit/test_toy_recipe.py`
checks that equality. Encoding here avoids the processor's per-image PIL pipeline, which would
dominate the cost of a CPU training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import LlavaProcessor

from vlens.data.scenes import (
    CAPTION_QUESTION,
    CELLS,
    COLOURS,
    QA,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    Scene,
    every_question,
)

# Per-patch label spaces of the vision pre-training heads; index 0 means "no object".
PATCH_HEADS: dict[str, int] = {
    "colour": len(COLOURS) + 1,
    "shape": len(SHAPES) + 1,
    "size": len(SIZES) + 1,
    "cell": len(CELLS) + 1,
}
N_COUNTS = 3


@dataclass(frozen=True, eq=False)
class ScenePool:
    """Scenes with their images as normalised tensors and their per-patch labels.

    Attributes:
        scenes: The scenes.
        pixels: Images scaled to [-1, 1] exactly as the toy processor does.
        patch_labels: For each head of `PATCH_HEADS`, the label of each patch (raster order).
        counts: Number of objects minus one.
    """

    scenes: list[Scene]
    pixels: Float[Tensor, "n 3 h w"]
    patch_labels: dict[str, Int[Tensor, "n patches"]]
    counts: Int[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.scenes)


def _patch_targets(scene: Scene) -> dict[str, np.ndarray]:
    owner = scene.patch_labels.reshape(-1)
    out = {name: np.zeros(owner.shape, dtype=np.int64) for name in PATCH_HEADS}
    for i, obj in enumerate(scene.objects):
        here = owner == i
        out["colour"][here] = 1 + list(COLOURS).index(obj.colour)
        out["shape"][here] = 1 + SHAPES.index(obj.shape)
        out["size"][here] = 1 + list(SIZES).index(obj.size)
        out["cell"][here] = 1 + obj.cell
    return out


def build_pool(scenes: list[Scene]) -> ScenePool:
    """Stacks the scenes' images and labels into tensors."""
    images = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes])  # [n, h, w, 3]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).div(255.0).sub(0.5).div(0.5)
    targets = [_patch_targets(s) for s in scenes]
    labels = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in PATCH_HEADS}
    counts = torch.tensor([len(s.objects) - 1 for s in scenes], dtype=torch.long)
    return ScenePool(scenes=scenes, pixels=pixels.contiguous(), patch_labels=labels, counts=counts)


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A text-only description of a scene, one sentence per object, in random order."""
    order = rng.permutation(len(scene.objects))
    return " ".join(f"there is {scene.objects[i].phrase} ." for i in order)


def sample_qa(scene: Scene, rng: np.random.Generator, caption_fraction: float) -> QA:
    """One question of a scene: a caption request with ``caption_fraction``, otherwise a question
    of a uniformly drawn kind (yes and no equally likely for presence questions)."""
    if rng.random() < caption_fraction:
        return caption_qa(scene)
    kind = QUESTION_KINDS[rng.integers(len(QUESTION_KINDS))]
    options = [qa for qa in scene.questions if qa.kind == kind]
    return options[rng.integers(len(options))]


def caption_qa(scene: Scene) -> QA:
    """The captioning request of a scene; the answer is the canonical caption."""
    return QA("caption", CAPTION_QUESTION, scene.caption)


def training_questions(scene: Scene) -> list[QA]:
    """Every question a packed training example asks about a scene: each object's colour,
    shape-at-place and where questions, the count and the two presence questions, and the
    caption request (`vlens.data.scenes.every_question`)."""
    return list(every_question(scene)) + [caption_qa(scene)]


def questions_for_eval(scene: Scene) -> list[QA]:
    """Every evaluated question of a scene: one per kind (two presence ones) and the caption."""
    return list(scene.questions) + [caption_qa(scene)]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch; ``labels`` is -100 outside the supervised tokens.

    Plain batches carry a 2D padding mask and no position ids. Packed batches (`Encoder.collate_packed`)
    carry a 4D additive mask ``[batch, 1, pos, pos]`` and the position of every token.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | Float[Tensor, "batch 1 pos pos"]
    labels: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"] | None = None


@dataclass(frozen=True)
class Packed:
    """Several dialogues that share their first ``n_shared`` tokens, stored as one sequence.

    ``ids``/``loss`` hold the shared tokens once, then each dialogue's own tokens (a branch).
    ``branch`` is 0 for shared tokens and k >= 1 for the k-th branch; ``positions`` restart
    after the shared part in every branch, so each branch sees exactly what it would alone.
    """

    ids: list[int]
    loss: list[bool]
    branch: list[int]
    positions: list[int]


class Encoder:
    """Word-level encoding of prompts through the processor's chat template.

    Args:
        processor: The toy processor.
        n_image_tokens: Placeholders one image expands to.
    """

    def __init__(self, processor: LlavaProcessor, n_image_tokens: int) -> None:
        self.processor = processor
        self.n_image_tokens = n_image_tokens
        tok = processor.tokenizer
        self._ids = tok.get_vocab()
        self.pad_id: int = tok.pad_token_id
        self.eos_token: str = tok.eos_token
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.image_token_id

    def _words_to_ids(self, words: list[str]) -> list[int]:
        try:
            return [self._ids[w] for w in words]
        except KeyError as err:  # never silently map a scene word to <unk>
            raise ValueError(f"word {err.args[0]!r} is not in the toy vocabulary") from err

    def prompt(self, text: str, *, with_image: bool) -> str:
        """Rendered generation prompt for a user turn (optionally with one image first)."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}],  # pyright: ignore[reportArgumentType]  # transformers types message content as str; a multimodal message's is a list of parts
            add_generation_prompt=True, tokenize=False,
        )

    def encode(self, text: str, answer: str, *, with_image: bool, loss_on: str = "answer"
               ) -> tuple[list[int], list[bool]]:
        """Ids of ``prompt(text) + " " + answer + " </s>"`` and which of them carry the loss.

        Args:
            text: The user text (a question, or a description followed by a question).
            answer: The assistant answer, without eos.
            with_image: Whether the user turn starts with an image.
            loss_on: ``"answer"`` (answer and eos) or ``"all"`` (everything after the bos).
        """
        prompt_words = self.prompt(text, with_image=with_image).split()
        expanded: list[str] = []
        for w in prompt_words:
            expanded.extend([w] * self.n_image_tokens if w == self.image_token else [w])
        answer_words = answer.split() + [self.eos_token]
        ids = self._words_to_ids(expanded + answer_words)
        if loss_on == "answer":
            mask = [False] * len(expanded) + [True] * len(answer_words)
        elif loss_on == "all":
            mask = [False] + [True] * (len(ids) - 1)
        else:
            raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
        return ids, mask

    def pack(self, encoded: list[tuple[list[int], list[bool]]]) -> Packed:
        """Packs encodings that start alike into one sequence whose branches cannot see each other.

        The shared part is the longest common prefix without supervised tokens (at least one
        token is left to every branch). With causal attention restricted to the shared part and
        the token's own branch, and positions restarted per branch, every branch computes what
        it would as its own sequence (`tests/unit/test_toy_recipe.py` checks the logits), while
        the shared context (an image's 64 tokens, a scene description) is computed once. Unlike
        a multi-turn dialogue, no answer can be copied from another question about the same scene.
        """
        if not encoded:
            raise ValueError("pack needs at least one encoding, got none")
        shortest = min(len(ids) for ids, _ in encoded)
        n_shared = 0
        first_ids, first_loss = encoded[0]
        while (n_shared < shortest - 1 and not first_loss[n_shared]
               and all(ids[n_shared] == first_ids[n_shared] and not loss[n_shared]
                       for ids, loss in encoded)):
            n_shared += 1
        if any(loss[n_shared] for _, loss in encoded):
            # The loss reads each token's prediction from the token stored before it, which
            # must then be in the same branch.
            raise ValueError("pack needs every branch to start with an unsupervised token; "
                             "got two dialogues with the same prompt")
        ids, loss = list(first_ids[:n_shared]), [False] * n_shared
        branch, positions = [0] * n_shared, list(range(n_shared))
        for k, (b_ids, b_loss) in enumerate(encoded, start=1):
            ids += b_ids[n_shared:]
            loss += b_loss[n_shared:]
            branch += [k] * (len(b_ids) - n_shared)
            positions += range(n_shared, len(b_ids))
        return Packed(ids, loss, branch, positions)

    def collate_packed(self, packed: list[Packed]) -> Batch:
        """Right-pads packed sequences into a `Batch` with a 4D mask and position ids.

        Token i may attend to token j iff j <= i and j is shared or in i's branch. Padding
        tokens attend to themselves only (they carry no loss), so no softmax row is empty.
        """
        if not packed:
            raise ValueError("collate_packed needs at least one packed sequence, got none")
        length = max(len(p.ids) for p in packed)
        input_ids = torch.full((len(packed), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(packed), length), -100, dtype=torch.long)
        positions = torch.zeros((len(packed), length), dtype=torch.long)
        allowed = torch.eye(length, dtype=torch.bool).repeat(len(packed), 1, 1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for row, p in enumerate(packed):
            n = len(p.ids)
            t = torch.tensor(p.ids, dtype=torch.long)
            input_ids[row, :n] = t
            labels[row, :n] = torch.where(torch.tensor(p.loss), t, -100)
            positions[row, :n] = torch.tensor(p.positions)
            branch = torch.tensor(p.branch)
            visible = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
            allowed[row, :n, :n] = visible & causal[:n, :n]
        mask = torch.zeros(allowed.shape, dtype=torch.float32)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return Batch(input_ids=input_ids, attention_mask=mask[:, None], labels=labels,
                     position_ids=positions)

    def collate(self, encoded: list[tuple[list[int], list[bool]]]) -> Batch:
        """Right-pads encodings into a `Batch`."""
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), length), dtype=torch.long)
        labels = torch.full((len(encoded), length), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(encoded):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[row, : len(ids)] = t
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.where(torch.tensor(mask), t, -100)
        return Batch(input_ids=input_ids, attention_mask=attention, labels=labels)
