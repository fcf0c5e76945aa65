"""The analyses of vlens: pure functions from a model and a cache (or inputs) to results.

Each returns a frozen dataclass with jaxtyped tensor fields and ``to_frame()``; each
module declares the hooks it reads (``required_hooks(model)``), so

    logits, cache = model.run_with_cache(inputs, names_filter=va.lens.required_hooks(model))
    result = va.logit_lens(model, cache)

caches only those. Per-layer results follow the layer-axis convention: index 0 is
``blocks.0.hook_resid_pre`` (the input embeddings), index l is
``blocks.{l-1}.hook_resid_post``; ``n_layers + 1`` entries. Everything is computed in
float32 whatever dtype the model runs in. A single-example batch gives the shapes in
each result's docstring; a batch of B > 1 rows adds a leading ``batch`` axis.
"""

from vlens.analysis import attention, dependence, knockout, lens, similarity, streaming, tokens
from vlens.analysis.attention import AttentionResult, SinkTokens, attention_to_image, find_sink_tokens
from vlens.analysis.dependence import PromptDependenceResult, prompt_dependence
from vlens.analysis.lens import LensResult, logit_lens
from vlens.analysis.similarity import SimilarityResult, modality_similarity
from vlens.analysis.streaming import (
    AttentionStats,
    AttentionStream,
    CurveStats,
    LensStats,
    LensStream,
    SimilarityStream,
)
from vlens.analysis.tokens import ContributionResult, CountCurveResult, token_contributions, token_count_curve

__all__ = [
    "AttentionResult",
    "AttentionStats",
    "AttentionStream",
    "ContributionResult",
    "CountCurveResult",
    "CurveStats",
    "LensResult",
    "LensStats",
    "LensStream",
    "PromptDependenceResult",
    "SimilarityResult",
    "SimilarityStream",
    "SinkTokens",
    "attention",
    "attention_to_image",
    "dependence",
    "find_sink_tokens",
    "knockout",
    "lens",
    "logit_lens",
    "modality_similarity",
    "prompt_dependence",
    "similarity",
    "streaming",
    "token_contributions",
    "token_count_curve",
    "tokens",
]
