"""Markdown tables for the model card, from one or more ``training_report.json`` files.

Usage::

    python -m vlens.zoo.card RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlens.zoo.evaluate import KINDS


def accuracy_table(reports: list[dict]) -> str:
    """Greedy exact-match accuracy per question type, one column per seed, plus the baseline."""
    seeds = [f"seed {r['seed']}" for r in reports]
    lines = ["| question type | n | " + " | ".join(seeds) + " | mean | most-common-answer baseline |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for kind in KINDS:
        accs = [r["greedy"]["accuracy"][kind] for r in reports]
        base = reports[0]["greedy"]["baseline"][kind]
        n = reports[0]["greedy"]["counts"][kind]
        cells = " | ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {kind} | {n} | {cells} | {sum(accs) / len(accs):.3f} | {base:.3f} |")
    return "\n".join(lines)


def stage_table(reports: list[dict]) -> str:
    """Per stage: wall time and the held-out check run right after it, per seed."""
    lines = ["| seed | stage | wall s | first loss | final loss | held-out check after the stage |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        for name, st in r["stages"].items():
            check = st.get("heldout") or st.get("heldout_text_only") or {}
            text = ", ".join(f"{k} {v:.3f}" for k, v in check.items())
            lines.append(f"| {r['seed']} | {name} | {st['seconds']:.0f} | {st['first_loss']:.3f} "
                         f"| {st['final_loss']:.3f} | {text} |")
    return "\n".join(lines)


def curve_table(reports: list[dict]) -> str:
    """Held-out checks during each stage (``checks``) and after it: the learning curves."""
    lines = ["| seed | stage | step | " + " | ".join(KINDS) + " |", "|---|---|---|" + "---|" * len(KINDS)]
    for r in reports:
        for name, st in r["stages"].items():
            points = list(st.get("checks", []))
            if not points:
                continue
            points.append((r["config"][name]["steps"], st["heldout"]))
            for step, scores in points:
                cells = " | ".join(f"{scores.get(k, float('nan')):.3f}" for k in KINDS)
                lines.append(f"| {r['seed']} | {name} | {step} | {cells} |")
    return "\n".join(lines)


def layer_table(report: dict) -> str:
    """Per layer: logit-lens match rates, shuffled control, and cosine similarities."""
    lay = report["layers"]
    lines = ["| layer | lens: colour or shape in top-5 | colour | shape | control (shuffled labels) "
             "| cos(visual, text) | cos(text, text) |", "|---|---|---|---|---|---|---|"]
    for i in range(len(lay["lens_match"])):
        lines.append(
            f"| {i} | {lay['lens_match'][i]:.3f} | {lay['lens_colour'][i]:.3f} "
            f"| {lay['lens_shape'][i]:.3f} | {lay['lens_control'][i]:.3f} "
            f"| {lay['cos_visual_text'][i]:.3f} | {lay['cos_text_text'][i]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prints the tables for the given run folders."""
    folders = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not folders:
        raise SystemExit("usage: python -m vlens.zoo.card RUN_DIR [RUN_DIR ...]")
    reports = [json.loads((f / "training_report.json").read_text()) for f in folders]
    print(accuracy_table(reports), end="\n\n")
    print(stage_table(reports), end="\n\n")
    print(curve_table(reports), end="\n\n")
    for r in reports:
        print(f"seed {r['seed']} ({r['layers']['n_patches']} object patches)")
        print(layer_table(r), end="\n\n")


if __name__ == "__main__":
    main()
