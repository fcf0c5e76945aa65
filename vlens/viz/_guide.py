"""One line per report figure: what to look for, and what the study found on the toy model.

The findings are those of ``docs/findings.md`` (each measured by a recipe in ``examples/`` over
held-out scenes and regression-tested in ``tests/acceptance/test_findings.py``); the numbers
quoted are the toy model's, at the recipes' defaults. On another model they are what to
compare with, not what to expect.
"""

from __future__ import annotations

FIGURE_GUIDE: dict[str, str] = {
    "fig-input": (
        "Look for: the crop and resolution the model really saw; every heatmap below is drawn on this image."
    ),
    "fig-lens": (
        "Look for: layers where object patches read their own colour or shape word. The study found this above "
        "a shuffled-label control from layer 4 on (toy, best layer 8: 0.18 of object patches vs 0.09 control)."
    ),
    "fig-lens-match": (
        "Look for: a rise with depth above the shuffled control. The study found it over 40 scenes (toy, layer 8: "
        "0.18 vs 0.09, p = 0.002); on one scene the rate can stay at 0."
    ),
    "fig-similarity": (
        "Look for: how visual states approach text states with depth. The study found a rise (toy: -0.05 to +0.08), "
        "but an untrained network shows it too, so compare with text-text similarity before reading it."
    ),
    "fig-similarity-map": (
        "Look for: whether object patches grow more text-like than background ones."
    ),
    "fig-attention-mass": (
        "Look for: the blocks and heads where the instruction reads the image. The study found 0.61-0.88 of the "
        "instruction's attention on image tokens (toy; uniform attention would give 0.89)."
    ),
    "fig-attention-received": (
        "Look for: object patches brighter than background. The study found object patches receive 2.7x the "
        "attention of background patches (toy, 40 of 40 scenes)."
    ),
    "patterns": (
        "Look for: heads whose text rows put their attention on image tokens, and which image tokens they pick "
        "(object patches, or a few sink tokens that draw attention whatever they show)."
    ),
    "fig-count-curve": (
        "Look for: how many visual tokens the answer needs before the loss flattens. The study found 4.7 nats "
        "with none and 0.002 with all 64 (toy); random subsets were lower than raster prefixes on average, "
        "not consistently."
    ),
    "fig-contributions": (
        "Look for: red object patches (removing them raises the loss). The study found single-token effects of "
        "about 1e-3 nats on the toy, object patches above background in 23 of 30 scenes."
    ),
    "fig-contributions-bar": (
        "Look for: query tokens whose removal raises the loss (positive bars: the token helps)."
    ),
    "fig-knockout-predictor-image": (
        "Look for: the layers where blocking the answer's predictor from the image costs log-probability. The "
        "study found the toy reads the image from the last position directly (about -0.35 nats in the 2-layer windows at layers 4-5)."
    ),
    "fig-knockout-predictor-instruction": (
        "Look for: the layers where the predictor needs the question. The study found it in the first layers "
        "(toy: -7.64 nats at layers 0-1), not the later windows Zhang et al. report."
    ),
    "fig-knockout-instruction-image": (
        "Look for: whether the question tokens need the image. The study found they hardly do on the toy "
        "(|delta| <= 0.001 nats in every window), unlike the models Zhang et al. studied."
    ),
    "fig-patching": (
        "Look for: the layers and visual tokens whose clean residual restores the answer. Bright cells where the "
        "two images differ show where the model carries the image's content."
    ),
    "fig-pruning": (
        "Look for: how much loss and exact match survive as fewer visual tokens are kept. The study found the "
        "toy keeps its answers at K = 2, keep 50% (accuracy 1.000 vs 1.000, 34% fewer FLOPs; random 0.958)."
    ),
    "fig-contextual-lens": (
        "Look for: object patches whose nearest text states are their colour or shape word. The study found the "
        "contextual lens reads them far more often than the logit lens (toy, layers 3-8: 0.84 vs 0.12)."
    ),
}
