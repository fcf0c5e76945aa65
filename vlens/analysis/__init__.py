"""The analyses of vlens: pure functions from a model and a cache (or inputs) to results.

Each returns a frozen dataclass with jaxtyped tensor fields and ``to_frame()``; each
module declares the hooks it reads (``required_hooks(model)``), so

    logits, cache = model.run_with_cache(inputs, names_filter=va.lens.required_hooks(model))
    result = va.logit_lens(model, cache)

caches only those. Per-layer results follow the layer-axis convention: index 0 is
``blocks.0.hook_resid_pre`` (the input embeddings), index l is
``blocks.{l-1}.hook_resid_post``; ``n_layers + 1`` entries. Everything is computed in
float32 whatever dtype the model runs in. Every result keeps a leading ``batch`` axis,
whatever the batch size; ``result.row(b)`` gives one example's values. Each analysis of
activations has one reduction, which its cache form and its stream (``SimilarityStream``,
``AttentionStream``, ``LensStream``; see :mod:`vlens.analysis.streaming`) share.
"""

from vlens.analysis import (
    attention,
    attribution,
    contextual,
    dependence,
    flow_knockout,
    knockout,
    lens,
    patching,
    pruning,
    similarity,
    streaming,
    tokens,
)
from vlens.analysis._spans import grid_cells
from vlens.analysis.attention import (
    AttentionResult,
    AttentionStats,
    AttentionStream,
    SinkTokens,
    attention_to_image,
    find_sink_tokens,
)
from vlens.analysis.attribution import AttributionResult, attribution_patching, rank_agreement
from vlens.analysis.contextual import ContextualLensResult, contextual_lens
from vlens.analysis.dependence import PromptDependenceResult, prompt_dependence
from vlens.analysis.flow_knockout import KnockoutResult, attention_knockout, layer_windows
from vlens.analysis.lens import LensResult, LensStats, LensStream, logit_lens
from vlens.analysis.patching import PatchingResult, activation_patching
from vlens.analysis.pruning import PruningResult, prune_visual_tokens
from vlens.analysis.similarity import SimilarityResult, SimilarityStream, modality_similarity
from vlens.analysis.streaming import CurveStats, Stream, run_streams
from vlens.analysis.tokens import ContributionResult, CountCurveResult, token_contributions, token_count_curve

__all__ = [
    "AttributionResult",
    "KnockoutResult",
    "PatchingResult",
    "activation_patching",
    "attention_knockout",
    "attribution",
    "attribution_patching",
    "flow_knockout",
    "grid_cells",
    "layer_windows",
    "patching",
    "rank_agreement",
    "AttentionResult",
    "AttentionStats",
    "AttentionStream",
    "ContributionResult",
    "ContextualLensResult",
    "CountCurveResult",
    "CurveStats",
    "LensResult",
    "LensStats",
    "LensStream",
    "PromptDependenceResult",
    "PruningResult",
    "SimilarityResult",
    "SimilarityStream",
    "SinkTokens",
    "Stream",
    "attention",
    "attention_to_image",
    "contextual",
    "contextual_lens",
    "dependence",
    "find_sink_tokens",
    "knockout",
    "lens",
    "logit_lens",
    "modality_similarity",
    "prompt_dependence",
    "prune_visual_tokens",
    "pruning",
    "run_streams",
    "similarity",
    "streaming",
    "token_contributions",
    "token_count_curve",
    "tokens",
]
