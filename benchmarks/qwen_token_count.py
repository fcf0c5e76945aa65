"""Qwen2-VL: token_count_curve's kv engine and HookedVLM's forward against plain Hugging Face.

A medium random Qwen2-VL (the text tower of benchmarks/overhead.py's medium model: d_model
512, 8 layers, 8 heads, FFN 1408, vocab 32000, here with Qwen2's q/k/v biases and 3-D
M-RoPE; a 4-layer, 128-wide ViT with 14 px patches merged 2 x 2) reads a 672 x 672 image:
48 x 48 patches, 24 x 24 = 576 visual tokens after the merge, after LLaVA-1.5's system
prompt, with the question and answer after them. In one process, after a warm-up:

1. ``token_count_curve(counts=0..576 step 8, order="raster", engine="kv")`` against the
   plain Hugging Face loop: a second, untouched copy of the checkpoint, one
   ``model(inputs_embeds=..., position_ids=...)`` per count on the kept embeddings at the
   kept tokens' own M-RoPE positions (Hugging Face's ``get_rope_index``, the definition
   docs/analyses.md states), logits at every position. Target: >= 5x, losses equal to 1e-4.
2. ``HookedVLM.forward`` against the Hugging Face eager forward of the same inputs (median
   of interleaved runs). Target: <= 1.05x.

Wall time is what the targets are about; the CPU time of this process is printed beside it
because it is far less disturbed by other work on a shared machine.

Usage: python -m benchmarks.qwen_token_count [--threads 2] [--step 8] [--runs 7] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._models import ANSWER, QUESTION, SYSTEM_PROMPT, VOCAB_SIZE, bench_image

CHAT_TEMPLATE = (
    SYSTEM_PROMPT + " {% for message in messages %}{{ message['role'] | upper }} : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
SIDE = 672  # px: 48 x 48 patches of 14 px, 24 x 24 tokens after the 2 x 2 merge


def build_medium_qwen2_vl(out: Path, seed: int = 0) -> Path:
    """Write the medium random Qwen2-VL to ``out`` (skipped when already there)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vlens.adapters._processors import images_only

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    specials = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    words = ["<pad>", "<s>", "</s>", "<unk>", *specials, "USER", "ASSISTANT"]
    words += sorted(set((SYSTEM_PROMPT + " " + QUESTION + " " + ANSWER).split()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(depth=4, embed_dim=128, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)
    processor = images_only(transformers.Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="interleaved forward runs (median is reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the random checkpoint here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import warnings

    import transformers

    from vlens import HookedVLM
    from vlens import analysis as va
    from vlens.adapters._processors import VideoProcessorUnavailableWarning
    from vlens.analysis.knockout import row_problems

    warnings.simplefilter("ignore", VideoProcessorUnavailableWarning)
    folder = build_medium_qwen2_vl(args.model_dir or Path(tempfile.mkdtemp()) / "medium_qwen2_vl")
    model = HookedVLM.from_pretrained(folder, device="cpu")
    baseline = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    image = bench_image().resize((SIDE, SIDE))
    inputs = model.prepare(image, QUESTION, answer=ANSWER)
    layout = inputs.layout
    n_img = int(layout.image_mask.sum())
    (problem,) = row_problems(model, inputs, "benchmark")
    targets = problem.ids[problem.answer]
    kwargs = inputs.model_kwargs()
    with torch.no_grad():
        hf_positions, _ = baseline.model.get_rope_index(
            kwargs["input_ids"], kwargs["mm_token_type_ids"], kwargs["image_grid_thw"],
            attention_mask=kwargs["attention_mask"],
        )  # [3, 1, pos]: Hugging Face's own M-RoPE positions
    counts = list(range(0, n_img + 1, args.step))
    if counts[-1] != n_img:
        counts.append(n_img)
    print(
        f"sequence: {inputs.input_ids.shape[1]} tokens = {int(layout.prefix_mask.sum())} prefix + {n_img} image "
        f"({layout.images[0][0].grid[0]}x{layout.images[0][0].grid[1]}) + {int(layout.instruction_mask.sum())} "
        f"instruction + {int(layout.answer_mask.sum())} answer; {len(counts)} counts, {args.threads} threads"
    )

    def hf_loss(k: int) -> torch.Tensor:
        keep = torch.ones(problem.ids.shape[0], dtype=torch.bool)
        keep[problem.image[k:]] = False
        kept = problem.embeds[keep][None]
        out = baseline(
            inputs_embeds=kept, position_ids=hf_positions[:, :, keep],
            attention_mask=torch.ones(1, kept.shape[1], dtype=torch.long),
        )
        new_index = keep.long().cumsum(0) - 1
        return torch.nn.functional.cross_entropy(out.logits[0, new_index[problem.answer] - 1].float(), targets)

    with torch.inference_mode():
        va.token_count_curve(model, inputs, counts=[0, n_img // 2, n_img], engine="kv")  # warm-up
        hf_loss(n_img // 2)
        start, cpu = time.perf_counter(), time.process_time()
        curve = va.token_count_curve(model, inputs, counts=counts, engine="kv", batch_size=args.batch_size)
        kv, kv_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        hf = torch.stack([hf_loss(k) for k in counts])
        loop, loop_cpu = time.perf_counter() - start, time.process_time() - cpu

        modes = {"hf_eager_forward": lambda: baseline(**kwargs).logits, "vlens_forward": lambda: model(inputs)}
        times: dict[str, list[float]] = {name: [] for name in modes}
        cpus: dict[str, list[float]] = {name: [] for name in modes}
        for fn in modes.values():
            fn()
        for _ in range(args.runs):
            for name, fn in modes.items():
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpus[name].append(time.process_time() - cpu)
        same = float((model(inputs) - baseline(**kwargs).logits).abs().max())

    if curve.engine != "kv":
        raise SystemExit(f"the kv engine did not run ({curve.engine_reason}); its timing is not a measurement of it")
    diff = float((curve.loss[0] - hf).abs().max())
    print(f"token_count_curve kv {kv:7.2f} s ({kv_cpu:.2f} s cpu); plain HF loop {loop:7.2f} s ({loop_cpu:.2f} s cpu)")
    print(f"speed-up hf_loop/kv: {loop / kv:.2f}x wall, {loop_cpu / kv_cpu:.2f}x cpu (target >= 5x); "
          f"max |loss_kv - loss_hf| = {diff:.2e} (<= 1e-4)")
    base, ours = statistics.median(times["hf_eager_forward"]), statistics.median(times["vlens_forward"])
    base_cpu, ours_cpu = statistics.median(cpus["hf_eager_forward"]), statistics.median(cpus["vlens_forward"])
    print(f"forward: HF {base * 1e3:.1f} ms, HookedVLM {ours * 1e3:.1f} ms: {ours / base:.3f}x wall, "
          f"{ours_cpu / base_cpu:.3f}x cpu (target <= 1.05x); max |logits diff| = {same:.1e}")


if __name__ == "__main__":
    main()
