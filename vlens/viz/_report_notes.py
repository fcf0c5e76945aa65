"""What the report says beside its figures: which labels the lens used, and the caveats a
figure needs when its values are empty, zero, or too small to read.

Kept apart from ``report.py`` so the sections there stay short: each function takes results
(or plain tensors) and returns words.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from vlens.analysis.lens import label_ids

# The token-removal engines agree with plain Hugging Face forwards to 1e-4 nats (the tolerance
# tests/parity holds them to): a loss change below that is not distinguishable from rounding.
NOISE_NATS = 1e-4
# A loss change of 0.01 nats multiplies the answer's probability by exp(-0.01), i.e. changes it
# by about 1%: below that, removing a token does not change what the model says.
TINY_NATS = 0.01
# An effect under 1% of the answer's loss is small next to what the answer costs anyway.
RELATIVE_TINY = 0.01
N_CONTROL_PERMUTATIONS = 200


@dataclass(frozen=True)
class LensLabels:
    """The expected word per image token for the lens's match rate, and where it came from.

    Attributes:
        words: One word (or None: no label) per token of the image span, the curve's labels.
        name: What a label is, for the legend (``"object's colour word"``, ``"given label"``).
        source: The sentence the report prints about them.
        shape_words: The object's shape word per token (scene labels only), a second curve.
        unknown: Label words the model's vocabulary lacks (those tokens count as unlabelled).
    """

    words: list[Optional[str]]
    name: str
    source: str
    shape_words: Optional[list[Optional[str]]] = None
    unknown: tuple[str, ...] = ()


def lens_labels_for(tokenizer: Any, span: Any, given: Optional[Sequence], scene: Any) -> Optional[LensLabels]:
    """The report's lens labels: ``given`` when there are any, else the scene's per-patch ground
    truth (None when neither labels this span)."""
    from vlens.analysis.lens import label_id
    from vlens.data.ground_truth import describe_labels, token_words

    if given is not None:
        words = list(given)
        name, source, shapes = "given label", f"given by the caller ({sum(w is not None for w in words)} of {len(words)} image tokens labelled)", None
    elif scene is not None:
        colours = token_words(scene, span, "colour")
        if colours is None:
            return None
        words, shapes = colours, token_words(scene, span, "shape")
        name = "object's colour word"
        source = describe_labels("colour (and, as a second curve, shape)", sum(w is not None for w in words), len(words))
    else:
        return None
    unknown = tuple(sorted({str(w) for w in words + (shapes or []) if w is not None and label_id(tokenizer, w) < 0}))
    if unknown:
        source += f"; {', '.join(unknown)} not in the model's vocabulary, so those tokens are unlabelled"
    if not any(w is not None and str(w) not in unknown for w in words):
        return None
    return LensLabels(words=words, name=name, source=source, shape_words=shapes, unknown=unknown)


def match_rate_curves(result: Any, tokenizer: Any, labels: LensLabels, span_order: Any) -> dict[str, torch.Tensor]:
    """Per-layer match rates of one example's lens result: the labels, the shape word (scene
    labels), and a control with the labels shuffled across the labelled tokens.

    Args:
        result: A one-row ``LensResult`` (batch axis kept) over the image positions.
        tokenizer: The model's tokenizer.
        labels: The report's labels, in span order.
        span_order: For each ``pos`` entry of ``result``, its index in the span (labels'
            order), -1 for a position outside the span (no label).
    """
    order = torch.as_tensor(span_order, dtype=torch.long)

    def ids(words: Sequence[Optional[str]]) -> torch.Tensor:
        in_span = label_ids(tokenizer, list(words))
        out = torch.full((order.numel(),), -1, dtype=torch.long)
        inside = order >= 0
        out[inside] = in_span[order[inside]]
        return out.unsqueeze(0)

    curves = {labels.name: result.match(ids(labels.words))[0]}
    if labels.shape_words is not None:
        curves["object's shape word"] = result.match(ids(labels.shape_words))[0]
    base = ids(labels.words)
    labelled = (base[0] >= 0).nonzero().flatten()
    gen = torch.Generator().manual_seed(0)
    controls = []
    for _ in range(N_CONTROL_PERMUTATIONS):
        shuffled = base.clone()
        shuffled[0, labelled] = base[0, labelled[torch.randperm(labelled.numel(), generator=gen)]]
        controls.append(result.match(shuffled)[0])
    curves["control: labels shuffled across labelled tokens"] = torch.stack(controls).mean(0)
    return curves


def match_rate_notes(curves: dict[str, torch.Tensor], top1_words: Sequence[str], k: int) -> list[str]:
    """A caveat when no labelled token's word is ever in the top-k (a flat line at 0)."""
    measured = [c for name, c in curves.items() if not name.startswith("control")]
    finite = torch.cat([c[torch.isfinite(c)] for c in measured]) if measured else torch.tensor([])
    if finite.numel() and float(finite.max()) > 0:
        return []
    common = ", ".join(f"'{w}' ({n})" for w, n in Counter(top1_words).most_common(3))
    return [
        f"The match rate is 0 at every layer: on this image no labelled token has its expected word among the "
        f"lens's top-{k}. The lens ran: at the last layer the labelled tokens read {common or 'nothing'} "
        "(the table below has every word). One scene is one sample; hit rates vary from scene to scene, so "
        "measure over many (vlens sweep, examples/logit_lens_visual_tokens.py) before reading anything into it."
    ]


def contribution_notes(values: torch.Tensor, full_loss: float) -> list[str]:
    """A caveat when the largest single-token effect is within numerical noise, tiny in absolute
    terms (under ``TINY_NATS``), or tiny next to the full loss (under ``RELATIVE_TINY`` of it)."""
    finite = values[torch.isfinite(values)].abs()
    if finite.numel() == 0:
        return ["No finite contribution: nothing to show."]
    largest = float(finite.max())
    if largest < NOISE_NATS:
        return [
            f"Within numerical noise: the largest effect, {largest:.1e} nats, is below {NOISE_NATS:.0e} nats, the "
            "agreement of the removal engines with plain forward passes; the pattern is rounding, not the model."
        ]
    if largest < TINY_NATS:
        change = (math.exp(largest) - 1) * 100
        return [
            f"Tiny effects: removing any single token changes the answer's loss by at most {largest:.1e} nats "
            f"(its probability by at most {change:.2f}%; full loss {full_loss:.3g} nats). Patterns at this scale "
            "(rows, stripes) say little about which tokens the answer uses; compare over many scenes."
        ]
    if largest < RELATIVE_TINY * full_loss:
        return [
            f"Tiny next to the loss: the largest single-token effect, {largest:.1e} nats, is under "
            f"{RELATIVE_TINY:.0%} of the full answer loss ({full_loss:.3g} nats); no single token matters much here."
        ]
    return []
