"""The analyses a sweep runs: thin wrappers over the streams and engines of ``vlens.analysis``.

Each wrapper adds what only a sweep needs: its parameters (recorded in the provenance), a
memory estimate, and the names of its per-example columns. The numbers themselves come from
the one implementation in ``vlens.analysis``: the streams' reductions (run inside the hooks
of the sweep's forward pass, or over a cache with ``stream=False``) and the token-removal
engine of ``token_count_curve``.

Per-example output columns are named ``"<analysis>.<field>"``; per-layer curves are lists
with one entry per layer index (``n_layers + 1`` for residual-stream analyses: 0 = input
embeddings; ``n_layers`` for attention: one per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional, Sequence

import torch
from torch import Tensor

from vlens.analysis.attention import AttentionStream
from vlens.analysis.lens import LensStream, label_id
from vlens.analysis.similarity import SimilarityStream
from vlens.analysis.streaming import Stream
from vlens.analysis.tokens import token_count_curve
from vlens.errors import AnalysisInputError
from vlens.sweep.catalog import ANALYSIS_NAMES

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.inputs import VLMInputs
    from vlens.layout import TokenLayout
    from vlens.model import HookedVLM


@dataclass
class Batch:
    """What analyses see of one batch: the prepared inputs, the examples, the RGB images."""

    inputs: "VLMInputs"
    examples: list
    images: list

    @property
    def layout(self) -> "TokenLayout":
        return self.inputs.layout

    @property
    def size(self) -> int:
        return len(self.examples)


class SweepAnalysis:
    """Base of the sweep analyses.

    A subclass sets ``name`` and ``layer_axis``, builds its stream (``make_stream``) or
    overrides ``rows`` for an analysis that runs the model itself, and says how much memory
    it adds (``activation_bytes``).
    """

    name: ClassVar[str] = ""
    #: "resid" (n_layers + 1 entries), "block" (n_layers), or None (no layer axis)
    layer_axis: ClassVar[Optional[str]] = "resid"

    def __init__(self, stream: bool = True) -> None:
        if not isinstance(stream, bool):
            raise AnalysisInputError(f"{self.name}: stream must be True or False, got {stream!r}")
        self.stream = stream
        self._stream: Optional[Stream] = None
        self._model: Optional["HookedVLM"] = None

    def params(self) -> dict[str, Any]:
        """Parameters that change results (recorded in the provenance)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stream": self.stream, "params": self.params()}

    def make_stream(self, model: "HookedVLM") -> Optional[Stream]:
        """The ``vlens.analysis`` stream computing this analysis (None: it runs the model itself)."""
        return None

    def stream_for(self, model: "HookedVLM") -> Optional[Stream]:
        if self._model is not model:
            self._model, self._stream = model, self.make_stream(model)
        return self._stream

    def hook_names(self, model: "HookedVLM") -> list[str]:
        stream = self.stream_for(model)
        return [] if stream is None else stream.required_hooks()

    def hooks(self, model: "HookedVLM", batch: Batch) -> list:
        """Hooks to attach to the batch's forward pass (the streaming form)."""
        stream = self.stream_for(model)
        return [] if stream is None else stream.hooks(batch.inputs)

    def reduce_cache(self, model: "HookedVLM", batch: Batch, cache: "VLMCache") -> None:
        """The same reductions over a cache of the batch (the ``stream=False`` form)."""
        stream = self.stream_for(model)
        if stream is not None:
            stream.reduce_cache(cache)

    def rows(self, model: "HookedVLM", batch: Batch) -> list[dict[str, Any]]:
        """One dict of columns per batch row, after the forward pass."""
        stream = self.stream_for(model)
        if stream is None:
            return [{} for _ in range(batch.size)]
        stream.commit()
        return self.columns(model, batch, stream.last_batch)

    def columns(self, model: "HookedVLM", batch: Batch, result: Any) -> list[dict[str, Any]]:
        """Per row, the columns of this analysis out of the stream's per-example values."""
        return [{} for _ in range(batch.size)]

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        """Memory this analysis adds to a forward pass of ``batch`` rows of ``seq`` tokens."""
        return 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}{', ' if args else ''}stream={self.stream})"


def _floats(t: Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]


# ---- modality similarity ------------------------------------------------------------


class ModalitySimilarity(SweepAnalysis):
    """Per layer, the mean cosine of image-token states to text: ``SimilarityResult.per_layer``
    of :func:`vlens.analysis.modality_similarity` (through :class:`~vlens.analysis.SimilarityStream`).

    Column: ``modality_similarity.per_layer`` (``n_layers + 1``).
    """

    name = "modality_similarity"
    AGAINST = ("text_states", "text_embeddings")

    def __init__(self, against: Literal["text_states", "text_embeddings"] = "text_states", text: str = "instruction",
                 stream: bool = True) -> None:
        super().__init__(stream)
        if against not in self.AGAINST:
            raise AnalysisInputError(f"{self.name}: against={against!r}; choose one of {list(self.AGAINST)}")
        if not isinstance(text, str):
            raise AnalysisInputError(f"{self.name}: text must be a segment name, got {text!r}")
        self.against: Literal["text_states", "text_embeddings"] = against
        self.text = text

    def params(self) -> dict[str, Any]:
        return {"against": self.against, "text": self.text}

    def make_stream(self, model: "HookedVLM") -> Stream:
        return SimilarityStream(model, against=self.against, text=self.text)

    def hook_names(self, model: "HookedVLM") -> list[str]:
        # The cache form reads the token ids from the cache, as modality_similarity does.
        extra = ["embed.hook_in"] if self.against == "text_embeddings" and not self.stream else []
        return super().hook_names(model) + extra

    def columns(self, model: "HookedVLM", batch: Batch, result: Any) -> list[dict[str, Any]]:
        return [{f"{self.name}.per_layer": _floats(result.per_layer[r])} for r in range(batch.size)]

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        return 4 * batch * seq * int(model.cfg.d_model) * 2  # float32 copies of one row's states


# ---- attention to the image ---------------------------------------------------------


class AttentionToImage(SweepAnalysis):
    """Per block, the share of attention the query tokens put on the image:
    ``AttentionResult.mass`` of :func:`vlens.analysis.attention_to_image` averaged over heads
    (``mass``), and its largest head (``max_head``).

    Columns: ``attention_to_image.mass``, ``attention_to_image.max_head`` (``n_layers`` each).
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

    def make_stream(self, model: "HookedVLM") -> Stream:
        return AttentionStream(model, query=self.query)

    def columns(self, model: "HookedVLM", batch: Batch, result: Any) -> list[dict[str, Any]]:
        return [
            {f"{self.name}.mass": _floats(result.mass[r].mean(-1)), f"{self.name}.max_head": _floats(result.mass[r].amax(-1))}
            for r in range(batch.size)
        ]

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        return 4 * int(model.cfg.n_heads) * seq * n_image


# ---- logit lens ---------------------------------------------------------------------


class LogitLens(SweepAnalysis):
    """The logit lens on the image tokens (:func:`vlens.analysis.logit_lens`, through
    :class:`~vlens.analysis.LensStream`), reduced to rates. Columns (``n_layers + 1`` each):

    * ``logit_lens.match``: ``LensResult.match`` with each image token labelled by the
      object word whose box holds the token's patch centre (the smallest such box); needs
      examples with ``boxes``, NaN otherwise.
    * ``logit_lens.object_hit``: ``LensResult.hit_rate`` of the example's object words
      (NaN without ``objects``).
    * ``logit_lens.final_agreement``: ``LensResult.final_agreement``.

    Words become ids by the lens's one rule (:func:`vlens.analysis.lens.word_id`); a word the
    vocabulary lacks is no label.
    """

    name = "logit_lens"

    def __init__(self, k: int = 5, stream: bool = True) -> None:
        super().__init__(stream)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise AnalysisInputError(f"{self.name}: k must be a positive int, got {k!r}")
        self.k = k

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def make_stream(self, model: "HookedVLM") -> Stream:
        return LensStream(model, positions="image", k=self.k)

    def columns(self, model: "HookedVLM", batch: Batch, result: Any) -> list[dict[str, Any]]:
        tok = model.tokenizer
        labels = torch.full(tuple(result.positions.shape), -1, dtype=torch.long)
        objects = []
        for r, ex in enumerate(batch.examples):
            row_labels = box_labels(model, batch, r, lambda word: label_id(tok, word))
            labels[r, : row_labels.numel()] = row_labels
            ids = sorted({i for i in (label_id(tok, w) for w in ex.objects) if i >= 0})
            objects.append(torch.tensor(ids, dtype=torch.long))
        match, hit, agree = result.match(labels), result.hit_rate(objects), result.final_agreement()
        return [
            {f"{self.name}.match": _floats(match[r]), f"{self.name}.object_hit": _floats(hit[r]),
             f"{self.name}.final_agreement": _floats(agree[r])}
            for r in range(batch.size)
        ]

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        return 4 * n_image * int(model.cfg.d_vocab) * 2 + 4 * n_image * int(model.cfg.d_model) * 2


def box_labels(model: "HookedVLM", batch: Batch, row: int, word_to_id: Any) -> Tensor:
    """Label id per image token of a row (-1: none): the object word whose box holds the
    centre of the token's pixel box (the smallest such object box), from the example's
    ``boxes``. Token boxes are the family adapter's (``ImageSpan.boxes``); a token without
    one (a learned query of the connector, a row-end newline) gets no label."""
    positions = batch.layout.image_positions(row)
    labels = torch.full((positions.numel(),), -1, dtype=torch.long)
    ex = batch.examples[row]
    spans = batch.layout.images[row]
    if not ex.boxes or not spans:
        return labels
    areas = [b[2] * b[3] for b in ex.boxes]
    order = sorted(range(len(ex.boxes)), key=lambda i: areas[i])
    offset = 0
    for span in spans:
        if span.image_index == 0 and span.boxes is not None:  # the example's boxes are on its first image
            centres = ((span.boxes[:, :2] + span.boxes[:, 2:]) / 2).tolist()
            for j, (px, py) in enumerate(centres):
                if px != px:  # NaN: no region
                    continue
                for i in order:
                    bx, by, bw, bh = ex.boxes[i]
                    if bx <= px <= bx + bw and by <= py <= by + bh:
                        labels[offset + j] = word_to_id(ex.objects[i])
                        break
        offset += span.n_tokens
    return labels


# ---- loss against the number of image tokens ----------------------------------------


class TokenCountCurve(SweepAnalysis):
    """Answer loss as a function of how many image tokens the language model sees:
    :func:`vlens.analysis.token_count_curve` (its kv engine where the family allows it).

    For each fraction f, the first ``round(f * n)`` image tokens (sequence order, i.e.
    raster order for grid images) are kept and the others removed. Columns:
    ``token_count_curve.loss`` (one per fraction; NaN without an answer),
    ``token_count_curve.counts``, ``token_count_curve.engine`` (the engine that ran).
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

    def rows(self, model: "HookedVLM", batch: Batch) -> list[dict[str, Any]]:
        layout = batch.layout
        counts = [[int(round(f * int(layout.image_mask[r].sum()))) for f in self.fractions] for r in range(batch.size)]
        out = [{f"{self.name}.loss": [math.nan] * len(self.fractions), f"{self.name}.counts": c,
                f"{self.name}.engine": None} for c in counts]
        answered = [r for r in range(batch.size) if bool(layout.answer_mask[r].any())]
        if not answered:
            return out
        inputs = batch.inputs if len(answered) == batch.size else _rows_of(model, batch.inputs, answered)
        union = sorted({c for r in answered for c in counts[r]})
        curve = token_count_curve(model, inputs, counts=union, order="raster", engine="kv")
        for i, r in enumerate(answered):
            losses = curve.loss[i]
            out[r][f"{self.name}.loss"] = [float(losses[union.index(c)]) for c in counts[r]]
            out[r][f"{self.name}.engine"] = curve.engine
        return out

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        d = int(model.cfg.d_model)
        return 4 * batch * seq * d + 4 * seq * int(model.cfg.d_vocab)


class VisualTokenPruning(SweepAnalysis):
    """FastV-style pruning: :func:`vlens.analysis.prune_visual_tokens` over a grid of layers K,
    keep fractions and rankings, per example.

    Columns (flat lists over the grid, ranking-major, then K, then keep, the order of
    ``prune_visual_tokens.grid``): ``.loss``, ``.exact`` (1.0 / 0.0), ``.flops_ratio`` (the
    unpruned loss is the sweep's ``answer_loss``). NaN without an answer.
    """

    name = "prune_visual_tokens"
    layer_axis = None

    def __init__(self, layers: Sequence[int] = (2,), keep: Sequence[float] = (0.25, 0.5, 0.75),
                 rankings: Sequence[str] = ("attention", "random"), stream: bool = True) -> None:
        super().__init__(stream)
        self.layers = tuple(int(k) for k in layers)
        self.keep = tuple(float(r) for r in keep)
        self.rankings = tuple(str(r) for r in rankings)
        if not self.layers or not self.keep or not self.rankings:
            raise AnalysisInputError(f"{self.name}: layers, keep and rankings must each be non-empty")

    def params(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "keep": list(self.keep), "rankings": list(self.rankings)}

    @property
    def grid(self) -> list[str]:
        """The cell each list entry stands for, e.g. ``"attention/K2/keep0.5"``."""
        return [f"{r}/K{k}/keep{f:g}" for r in self.rankings for k in self.layers for f in self.keep]

    def rows(self, model: "HookedVLM", batch: Batch) -> list[dict[str, Any]]:
        from vlens.analysis.pruning import prune_visual_tokens

        n = len(self.grid)
        out: list[dict[str, Any]] = [{f"{self.name}.loss": [math.nan] * n, f"{self.name}.exact": [math.nan] * n,
                                      f"{self.name}.flops_ratio": [math.nan] * n}
                                     for _ in range(batch.size)]
        layout = batch.layout
        answered = [r for r in range(batch.size) if bool(layout.answer_mask[r].any())]
        if not answered:
            return out
        inputs = batch.inputs if len(answered) == batch.size else _rows_of(model, batch.inputs, answered)
        result = prune_visual_tokens(model, inputs, layers=self.layers, keep=self.keep, rankings=self.rankings)
        for i, r in enumerate(answered):
            shape = result.loss[i].shape
            out[r][f"{self.name}.loss"] = _floats(result.loss[i].flatten())
            out[r][f"{self.name}.exact"] = _floats(result.exact[i].float().flatten())
            out[r][f"{self.name}.flops_ratio"] = _floats(result.flops_ratio[i][None].expand(shape).flatten())
        return out

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        # One row at a time, as many variants as rankings, logits only at the answer rows.
        return 4 * len(self.rankings) * seq * int(model.cfg.d_model) * 4


class AttentionKnockout(SweepAnalysis):
    """The answer's log-probability with ``query -> key`` attention blocked over windows of layers:
    :func:`vlens.analysis.attention_knockout` (spans by name; its kv engine where the family allows it).

    Columns: ``attention_knockout.delta_logprob`` (one per window; NaN without an answer),
    ``attention_knockout.window_start`` and ``attention_knockout.window_size`` (the windows),
    ``attention_knockout.engine``.
    """

    name = "attention_knockout"
    layer_axis = None

    def __init__(self, query: str = "predictor", key: str = "image", sizes: Sequence[int] = (1,), stream: bool = True) -> None:
        super().__init__(stream)
        from vlens.analysis._spans import SPAN_NAMES

        for what, value in (("query", query), ("key", key)):
            if value not in SPAN_NAMES:
                raise AnalysisInputError(f"{self.name}: {what} {value!r} is not a span name; choose from {list(SPAN_NAMES)}")
        self.query, self.key, self.sizes = query, key, tuple(int(s) for s in sizes)

    def params(self) -> dict[str, Any]:
        return {"query": self.query, "key": self.key, "sizes": list(self.sizes)}

    def rows(self, model: "HookedVLM", batch: Batch) -> list[dict[str, Any]]:
        from vlens.analysis.flow_knockout import attention_knockout, layer_windows

        windows = layer_windows(model.n_layers, self.sizes)
        out = [{f"{self.name}.delta_logprob": [math.nan] * len(windows), f"{self.name}.window_start": [w[0] for w in windows],
                f"{self.name}.window_size": [w[1] for w in windows], f"{self.name}.engine": None} for _ in range(batch.size)]
        layout = batch.layout
        answered = [r for r in range(batch.size) if bool(layout.answer_mask[r].any())]
        if not answered:
            return out
        inputs = batch.inputs if len(answered) == batch.size else _rows_of(model, batch.inputs, answered)
        result = attention_knockout(model, inputs, self.query, self.key, windows=windows)
        for i, r in enumerate(answered):
            out[r][f"{self.name}.delta_logprob"] = _floats(result.delta_logprob[i])
            out[r][f"{self.name}.engine"] = result.engine
        return out

    def activation_bytes(self, model: "HookedVLM", batch: int, seq: int, n_image: int) -> int:
        d = int(model.cfg.d_model)
        return 16 * (4 * seq * d + seq * seq) + 4 * seq * int(model.cfg.d_vocab)


def _rows_of(model: "HookedVLM", inputs: "VLMInputs", rows: list[int]) -> "VLMInputs":
    """Some rows of a batch, prepared again from the texts the processor saw."""
    return model.prepare(
        [list(inputs.images[r]) for r in rows],
        [inputs.texts[r] for r in rows],
        answer=[inputs.answers[r] for r in rows],
        chat_template=False,
    )


ANALYSES: dict[str, type[SweepAnalysis]] = {
    cls.name: cls for cls in (
        ModalitySimilarity, AttentionToImage, LogitLens, TokenCountCurve, VisualTokenPruning, AttentionKnockout,
    )
}
if tuple(ANALYSES) != ANALYSIS_NAMES:  # the catalog the CLI reads must name exactly these
    raise ImportError(f"vlens.sweep.catalog lists {ANALYSIS_NAMES}, the registry has {tuple(ANALYSES)}")


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
