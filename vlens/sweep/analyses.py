"""The analyses a sweep runs, in forms that reduce each batch to a few numbers per example.

Each analysis attaches hooks to ``model.hooks()`` and reduces the activation it sees at once
(streaming), so no layer's full activations outlive its hook. With ``stream=False`` the same
reductions run on a cache from ``model.run_with_cache`` instead; that form is kept for checking
and for small models, and is the one the memory estimate can refuse.

These are written on top of ``HookedVLM.hooks`` here rather than imported from
``vlens.analysis``: they must reduce inside hooks, over a batch, to per-example rows. Their
definitions follow the analyses of the same name (see each class), and the tests check them
against ``vlens.analysis`` on the same inputs.

Per-example output columns are named ``"<analysis>.<field>"``; per-layer curves are lists
with one entry per layer index (``n_layers + 1`` for residual-stream analyses: 0 = input
embeddings; ``n_layers`` for attention: one per block).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from vlens.errors import AnalysisInputError

EPS = 1e-8


def resid_hooks(n_layers: int) -> list[str]:
    """Residual stream at every layer boundary, in layer-index order."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _tensor(t: Any) -> Optional[Tensor]:
    if isinstance(t, tuple):
        t = t[0] if t and isinstance(t[0], Tensor) else None
    return t if isinstance(t, Tensor) else None


@dataclass
class Batch:
    """What analyses see of one batch: the prepared inputs, the examples, the RGB images."""

    inputs: Any
    examples: list
    images: list
    state: dict = field(default_factory=dict)

    @property
    def layout(self) -> Any:
        return self.inputs.layout

    @property
    def size(self) -> int:
        return len(self.examples)

    def positions(self, row: int, segment: str) -> Tensor:
        return self.layout.mask(segment)[row].nonzero().flatten()

    def image_positions(self, row: int) -> Tensor:
        return self.layout.image_positions(row)


class SweepAnalysis:
    """Base of the sweep analyses. Subclasses set ``name`` and ``layer_axis`` and override
    ``hook_names``, ``start``, ``reduce``, ``rows`` and ``activation_bytes``."""

    name: ClassVar[str] = ""
    #: "resid" (n_layers + 1 entries), "block" (n_layers), or None (no layer axis)
    layer_axis: ClassVar[Optional[str]] = "resid"

    def __init__(self, stream: bool = True) -> None:
        if not isinstance(stream, bool):
            raise AnalysisInputError(f"{self.name}: stream must be True or False, got {stream!r}")
        self.stream = stream

    def params(self) -> dict[str, Any]:
        """Parameters that change results (recorded in the provenance)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stream": self.stream, "params": self.params()}

    def hook_names(self, model: Any) -> list[str]:
        return []

    def start(self, model: Any, batch: Batch) -> None:
        """Reset per-batch state before the forward pass."""

    def reduce(self, model: Any, batch: Batch, name: str, tensor: Tensor) -> None:
        """Fold one hook's activation (whole batch) into per-row numbers."""

    def rows(self, model: Any, batch: Batch) -> list[dict[str, Any]]:
        """One dict of columns per batch row, after the forward pass."""
        return [{} for _ in range(batch.size)]

    def activation_bytes(self, model: Any, batch: int, seq: int, n_image: int) -> int:
        """Memory this analysis adds to a forward pass of ``batch`` rows of ``seq`` tokens."""
        return 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}{', ' if args else ''}stream={self.stream})"


def _nan_list(n: int) -> list[float]:
    return [math.nan] * n


# ---- modality similarity ------------------------------------------------------------


class ModalitySimilarity(SweepAnalysis):
    """Per layer, the mean cosine of image-token states to text (``vlens.analysis.modality_similarity``).

    ``per_layer[l] = mean_{i in image, t in text} cos(v_i, h_t)``, computed as the dot
    product of the mean unit image vector and the mean unit text vector (the same number,
    reduced inside the hook). ``against="text_states"``: ``h_t`` is the text token's state
    at the same layer; ``"text_embeddings"``: its input embedding.

    Column: ``modality_similarity.per_layer`` (``n_layers + 1``).
    """

    name = "modality_similarity"
    AGAINST = ("text_states", "text_embeddings")

    def __init__(self, against: str = "text_states", text: str = "instruction", stream: bool = True) -> None:
        super().__init__(stream)
        if against not in self.AGAINST:
            raise AnalysisInputError(f"{self.name}: against={against!r}; choose one of {list(self.AGAINST)}")
        if not isinstance(text, str):
            raise AnalysisInputError(f"{self.name}: text must be a segment name, got {text!r}")
        self.against, self.text = against, text

    def params(self) -> dict[str, Any]:
        return {"against": self.against, "text": self.text}

    def hook_names(self, model: Any) -> list[str]:
        return resid_hooks(model.n_layers)

    def start(self, model: Any, batch: Batch) -> None:
        n = model.n_layers + 1
        self.layer_of = {h: i for i, h in enumerate(resid_hooks(model.n_layers))}
        self.out = [_nan_list(n) for _ in range(batch.size)]
        self.img = [batch.image_positions(r) for r in range(batch.size)]
        self.txt = [batch.positions(r, self.text) for r in range(batch.size)]
        self.emb_mean = None
        if self.against == "text_embeddings":
            w = model.W_E.detach()
            self.emb_mean = [
                _unit(w[batch.inputs.input_ids[r, t].to(w.device)].float()).mean(0) if t.numel() else None
                for r, t in enumerate(self.txt)
            ]

    def reduce(self, model: Any, batch: Batch, name: str, tensor: Tensor) -> None:
        layer = self.layer_of.get(name)
        if layer is None:
            return
        for r in range(batch.size):
            img, txt = self.img[r], self.txt[r]
            if img.numel() == 0 or txt.numel() == 0:
                continue
            v = _unit(tensor[r, img.to(tensor.device)].float()).mean(0)
            if self.emb_mean is not None:
                t = self.emb_mean[r].to(v.device)
            else:
                t = _unit(tensor[r, txt.to(tensor.device)].float()).mean(0)
            self.out[r][layer] = float(v @ t)

    def rows(self, model: Any, batch: Batch) -> list[dict[str, Any]]:
        return [{f"{self.name}.per_layer": o} for o in self.out]

    def activation_bytes(self, model: Any, batch: int, seq: int, n_image: int) -> int:
        return 4 * batch * seq * int(model.cfg.d_model) * 2  # float32 copies of one row's states


# ---- attention to the image ---------------------------------------------------------


class AttentionToImage(SweepAnalysis):
    """Per block, the share of attention the query tokens put on the image
    (``vlens.analysis.attention_to_image``'s ``mass``, averaged over heads).

    ``mass[l] = mean_h mean_{q in Q} sum_{k in image} A[l, h, q, k]``; ``max_head[l]`` is
    the largest head's mass. Columns: ``attention_to_image.mass``,
    ``attention_to_image.max_head`` (``n_layers`` each).
    """

    name = "attention_to_image"
    layer_axis = "block"

    def __init__(self, query: str = "instruction", stream: bool = True) -> None:
        super().__init__(stream)
        if not isinstance(query, str):
            raise AnalysisInputError(f"{self.name}: query must be a segment name, got {query!r}")
        self.query = query

    def params(self) -> dict[str, Any]:
        return {"query": self.query}

    def hook_names(self, model: Any) -> list[str]:
        return [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]

    def start(self, model: Any, batch: Batch) -> None:
        n = model.n_layers
        self.layer_of = {h: i for i, h in enumerate(self.hook_names(model))}
        self.mass = [_nan_list(n) for _ in range(batch.size)]
        self.max_head = [_nan_list(n) for _ in range(batch.size)]
        self.img = [batch.image_positions(r) for r in range(batch.size)]
        self.q = [batch.positions(r, self.query) for r in range(batch.size)]

    def reduce(self, model: Any, batch: Batch, name: str, tensor: Tensor) -> None:
        layer = self.layer_of.get(name)
        if layer is None:
            return
        for r in range(batch.size):
            img, q = self.img[r], self.q[r]
            if img.numel() == 0 or q.numel() == 0:
                continue
            a = tensor[r][:, q.to(tensor.device)][:, :, img.to(tensor.device)].float()  # [head, q, img]
            per_head = a.sum(-1).mean(-1)
            self.mass[r][layer] = float(per_head.mean())
            self.max_head[r][layer] = float(per_head.max())

    def rows(self, model: Any, batch: Batch) -> list[dict[str, Any]]:
        return [{f"{self.name}.mass": m, f"{self.name}.max_head": h} for m, h in zip(self.mass, self.max_head)]

    def activation_bytes(self, model: Any, batch: int, seq: int, n_image: int) -> int:
        return 4 * int(model.cfg.n_heads) * seq * n_image


# ---- logit lens ---------------------------------------------------------------------


def _fp32_readout(model: Any) -> tuple[Any, Any]:
    """The language model's final norm and unembedding, computing in float32 (as the lens does)."""
    norm = model.bridge.ln_final.original_component
    params = list(norm.parameters())
    if params and params[0].dtype != torch.float32:
        norm = copy.deepcopy(norm).float()
    head = model.hf_model.get_output_embeddings()
    weight = head.weight.detach().float()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()

    def unembed(x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x.float().to(weight.device), weight, bias)

    device = params[0].device if params else None  # with a device_map, layers live on several devices
    return (lambda x: norm(x.float().to(device)).float()), unembed


class LogitLens(SweepAnalysis):
    """The logit lens on the image tokens (``vlens.analysis.logit_lens``), reduced to rates.

    At every layer index l, each image token's residual goes through the final norm and
    the unembedding (float32); only its top-``k`` ids are kept. Columns (``n_layers + 1``
    entries each):

    * ``logit_lens.match``: the fraction of labelled image tokens whose label is in the
      top-k. A token's label is the object word whose box holds the token's patch centre
      (the smallest such box), so this needs examples with ``boxes``; NaN otherwise.
    * ``logit_lens.object_hit``: the fraction of image tokens whose top-k holds any of
      the example's object words (NaN without ``objects``).
    * ``logit_lens.final_agreement``: the fraction of image tokens whose top-1 at layer l
      equals their top-1 at the last layer.

    A word's token is its first token when tokenized alone (as in ``logit_lens``); a word
    that maps to the unknown token is no label.
    """

    name = "logit_lens"

    def __init__(self, k: int = 5, stream: bool = True) -> None:
        super().__init__(stream)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise AnalysisInputError(f"{self.name}: k must be a positive int, got {k!r}")
        self.k = k

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def hook_names(self, model: Any) -> list[str]:
        return resid_hooks(model.n_layers)

    def _word_id(self, model: Any, word: str) -> int:
        cache = self.__dict__.setdefault("_word_ids", {})
        if word not in cache:
            tok = model.tokenizer
            ids = tok.encode(word, add_special_tokens=False)
            cache[word] = -1 if not ids or ids[0] == tok.unk_token_id else int(ids[0])
        return cache[word]

    def start(self, model: Any, batch: Batch) -> None:
        if getattr(self, "_model", None) is not model:
            self._model = model
            self._norm, self._unembed = _fp32_readout(model)
        n = model.n_layers + 1
        self.layer_of = {h: i for i, h in enumerate(resid_hooks(model.n_layers))}
        self.img = [batch.image_positions(r) for r in range(batch.size)]
        self.top: list[list[Optional[Tensor]]] = [[None] * n for _ in range(batch.size)]
        self.labels = [self._token_labels(model, batch, r) for r in range(batch.size)]
        self.objects = [
            torch.tensor(sorted({i for i in (self._word_id(model, w) for w in ex.objects) if i >= 0}), dtype=torch.long)
            for ex in batch.examples
        ]

    def _token_labels(self, model: Any, batch: Batch, row: int) -> Tensor:
        """Label id per image token of the row (-1: none), from the example's boxes."""
        n = self.img[row].numel()
        ex = batch.examples[row]
        labels = torch.full((n,), -1, dtype=torch.long)
        spans = batch.layout.images[row]
        if not ex.boxes or not spans:
            return labels
        width, height = batch.images[row].size
        x0, y0, w, h = 0.0, 0.0, float(width), float(height)
        if getattr(getattr(model.processor, "image_processor", None), "do_center_crop", False):
            side = float(min(width, height))  # the grid covers the central square crop
            x0, y0, w, h = (width - side) / 2, (height - side) / 2, side, side
        areas = [b[2] * b[3] for b in ex.boxes]
        order = sorted(range(len(ex.boxes)), key=lambda i: areas[i])
        offset = 0
        for span in spans:
            if span.image_index == 0 and span.grid is not None:
                rows, cols = span.grid
                for j in range(span.n_tokens):
                    r, c = span.row_col[j].tolist()
                    if span.tile[j] != 0 or r < 0:
                        continue
                    px, py = x0 + (c + 0.5) / cols * w, y0 + (r + 0.5) / rows * h
                    for i in order:
                        bx, by, bw, bh = ex.boxes[i]
                        if bx <= px <= bx + bw and by <= py <= by + bh:
                            labels[offset + j] = self._word_id(model, ex.objects[i])
                            break
            offset += span.n_tokens
        return labels

    def reduce(self, model: Any, batch: Batch, name: str, tensor: Tensor) -> None:
        layer = self.layer_of.get(name)
        if layer is None:
            return
        with torch.no_grad():
            for r in range(batch.size):
                img = self.img[r]
                if img.numel() == 0:
                    continue
                logits = self._unembed(self._norm(tensor[r, img.to(tensor.device)]))
                self.top[r][layer] = logits.topk(self.k, dim=-1).indices.cpu()  # topk of logits = of log-probs

    def rows(self, model: Any, batch: Batch) -> list[dict[str, Any]]:
        n = model.n_layers + 1
        out = []
        for r in range(batch.size):
            match, hit, agree = _nan_list(n), _nan_list(n), _nan_list(n)
            final = self.top[r][-1]
            labels, objects = self.labels[r], self.objects[r]
            for l, top in enumerate(self.top[r]):
                if top is None:
                    continue
                if (labels >= 0).any():
                    lab = labels >= 0
                    match[l] = float((top[lab] == labels[lab, None]).any(-1).float().mean())
                if objects.numel():
                    hit[l] = float(torch.isin(top, objects).any(-1).float().mean())
                if final is not None:
                    agree[l] = float((top[:, 0] == final[:, 0]).float().mean())
            out.append({f"{self.name}.match": match, f"{self.name}.object_hit": hit,
                        f"{self.name}.final_agreement": agree})
        return out

    def activation_bytes(self, model: Any, batch: int, seq: int, n_image: int) -> int:
        return 4 * n_image * int(model.cfg.d_vocab) * 2 + 4 * n_image * int(model.cfg.d_model) * 2


# ---- loss against the number of image tokens ----------------------------------------


class TokenCountCurve(SweepAnalysis):
    """Answer loss as a function of how many image tokens the language model sees.

    For each fraction f, the first ``round(f * n)`` image tokens (sequence order, i.e.
    raster order for grid images) are kept, the others removed, and the language model
    runs on the shortened embeddings with positions renumbered (``HookedVLM.
    input_embeddings`` + ``run_language_model``). ``loss`` is the mean cross-entropy
    over the answer tokens (NaN without an answer). Columns:
    ``token_count_curve.loss`` (one per fraction), ``token_count_curve.counts``.
    """

    name = "token_count_curve"
    layer_axis = None

    def __init__(self, fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), stream: bool = True) -> None:
        super().__init__(stream)
        fr = tuple(float(f) for f in fractions)
        if not fr or any(not 0.0 <= f <= 1.0 for f in fr) or list(fr) != sorted(set(fr)):
            raise AnalysisInputError(
                f"{self.name}: fractions must be increasing, distinct, in [0, 1]; got {fractions!r}")
        self.fractions = fr

    def params(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions)}

    def rows(self, model: Any, batch: Batch) -> list[dict[str, Any]]:
        layout = batch.layout
        out = []
        embeds = None
        per_token = getattr(model.adapter, "per_token_inputs", ())  # e.g. Gemma3's token_type_ids
        with torch.no_grad():
            for r in range(batch.size):
                img = batch.image_positions(r)
                counts = [int(round(f * img.numel())) for f in self.fractions]
                answer = batch.positions(r, "answer")
                losses = _nan_list(len(counts))
                if answer.numel():
                    if embeds is None:
                        embeds = model.input_embeddings(batch.inputs).embeds
                    length = int(layout.lengths[r])
                    ids = batch.inputs.input_ids[r]
                    is_img = layout.image_mask[r, :length]
                    for j, k in enumerate(counts):
                        keep = ~is_img.clone()
                        keep[img[:k]] = True
                        kept = keep.nonzero().flatten()
                        new_index = torch.cumsum(keep.long(), 0) - 1  # old position -> new position
                        pred = new_index[answer] - 1  # the position that predicts each answer token
                        extras = {k: batch.inputs.extras[k][r : r + 1, kept.to(batch.inputs.extras[k].device)]
                                  for k in per_token if k in batch.inputs.extras}
                        logits, _ = model.run_language_model(
                            embeds[r : r + 1, kept.to(embeds.device)],
                            attention_mask=torch.ones(1, kept.numel(), dtype=torch.long, device=embeds.device),
                            position_ids=torch.arange(kept.numel(), device=embeds.device)[None],
                            logits_to_keep=pred.to(embeds.device),
                            extras=extras or None,
                        )
                        lp = torch.log_softmax(logits[0].float(), -1)
                        target = ids[answer].to(lp.device)
                        losses[j] = float(-lp.gather(-1, target[:, None]).mean())
                out.append({f"{self.name}.loss": losses, f"{self.name}.counts": counts})
        return out

    def activation_bytes(self, model: Any, batch: int, seq: int, n_image: int) -> int:
        d = int(model.cfg.d_model)
        return 4 * batch * seq * d + 4 * seq * int(model.cfg.d_vocab)


ANALYSES: dict[str, type[SweepAnalysis]] = {
    cls.name: cls for cls in (ModalitySimilarity, AttentionToImage, LogitLens, TokenCountCurve)
}
DEFAULT_ANALYSES = ("modality_similarity", "attention_to_image", "logit_lens")


def build_analyses(
    analyses: Sequence[Any], params: Optional[dict[str, dict[str, Any]]] = None
) -> list[SweepAnalysis]:
    """Analysis objects from names (with ``params[name]`` as keyword arguments) or instances."""
    params = dict(params or {})
    built: list[SweepAnalysis] = []
    for a in analyses:
        if isinstance(a, SweepAnalysis):
            built.append(a)
            continue
        if a not in ANALYSES:
            raise AnalysisInputError(f"unknown sweep analysis {a!r}; choose from {sorted(ANALYSES)}")
        kwargs = params.pop(a, {})
        try:
            built.append(ANALYSES[a](**kwargs))
        except TypeError as exc:
            raise AnalysisInputError(f"bad parameters for {a}: {kwargs!r} ({exc})") from None
    if params:
        raise AnalysisInputError(f"params given for analyses not in the sweep: {sorted(params)}")
    names = [a.name for a in built]
    if not built or len(set(names)) != len(names):
        raise AnalysisInputError(f"choose at least one analysis, each once; got {names}")
    return built
