"""The shipped toy VLM's held-out accuracy, answered through ``HookedVLM.generate``.

The model card's table (docs/toy_model.md) comes from the recipe's own evaluation, which runs the
plain Hugging Face ``generate``. This script answers the same held-out stream through vlens's
generation (TransformerLens bridge, key/value cache) and, beside it, through the plain Hugging Face
model on the same checkpoint, so a dependency release that breaks cached decoding under the bridge
shows as a gap between the two columns.

Usage: python -m benchmarks.toy_accuracy [--scenes 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from vlens import HookedVLM
from vlens.data import make_scenes
from vlens.zoo import toy_checkpoint_path
from vlens.zoo.evaluate import KINDS, greedy_answers
from vlens.zoo.examples import questions_for_eval
from vlens.zoo.train import EVAL_STREAM_SEED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = HookedVLM.from_pretrained("toy")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(toy_checkpoint_path(), attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(toy_checkpoint_path())
    scenes = make_scenes(args.scenes, EVAL_STREAM_SEED, "heldout")
    qas = [(s, qa) for s in scenes for qa in questions_for_eval(s)]
    started = time.perf_counter()
    right_vlens: dict[str, list[bool]] = defaultdict(list)
    right_hf: dict[str, list[bool]] = defaultdict(list)
    for kind_is_caption, budget in ((False, 4), (True, 32)):
        chosen = [(s, qa) for s, qa in qas if (qa.kind == "caption") == kind_is_caption]
        hf = greedy_answers(plain, processor, [s.image for s, _ in chosen], [qa.question for _, qa in chosen], budget)
        for (scene, qa), hf_answer in zip(chosen, hf):
            got = model.generate(model.prepare(scene.image, qa.question), max_new_tokens=budget).text[0]
            right_vlens[qa.kind].append(got == qa.answer)
            right_hf[qa.kind].append(hf_answer == qa.answer)
    print(f"{args.scenes} held-out scenes (stream seed {EVAL_STREAM_SEED}), {time.perf_counter() - started:.0f}s")
    print(f"{'kind':10s} {'n':>5s} {'vlens':>7s} {'plain HF':>9s}")
    for kind in KINDS:
        v, h = right_vlens[kind], right_hf[kind]
        print(f"{kind:10s} {len(v):5d} {sum(v) / len(v):7.3f} {sum(h) / len(h):9.3f}")


if __name__ == "__main__":
    main()
