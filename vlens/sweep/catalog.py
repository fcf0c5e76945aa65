"""The names of the sweep's analyses, importable without torch (the CLI's help lists them).

``vlens.sweep.analyses.ANALYSES`` registers a class under each name; importing that module
checks the two agree.
"""

ANALYSIS_NAMES: tuple[str, ...] = (
    "modality_similarity", "attention_to_image", "logit_lens", "token_count_curve", "prune_visual_tokens",
    "attention_knockout",
)
DEFAULT_ANALYSES: tuple[str, ...] = ("modality_similarity", "attention_to_image", "logit_lens")
