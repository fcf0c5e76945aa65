"""Medium random LLaVA checkpoints for benchmarks (random weights, real shapes).

Text tower: Llama, d_model 512, 8 layers, 8 heads, FFN 1408, vocab 32000. Vision tower:
CLIP, d 256, 6 layers, patch 14, at 224 px (256 image tokens) or 336 px (576, the
LLaVA-1.5 layout). The tokenizer is word-level over 32000 synthetic words plus the
prompt words, so prompts tokenize to realistic lengths without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 32000
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the human 's questions ."
)
QUESTION = "What is the man doing in the picture and why is it unusual ? Answer in one sentence ."
ANSWER = "The man is ironing clothes on a board attached to the back of a moving taxi , which is unusual ."

CHAT_TEMPLATE = (
    SYSTEM_PROMPT + " {% for message in messages %}{{ message['role'] | upper }} : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER", "ASSISTANT"]
    words += sorted(set((SYSTEM_PROMPT + " " + QUESTION + " " + ANSWER).split()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast


def build_medium_llava(out: Path, image_size: int = 224, seed: int = 0) -> Path:
    """Write the medium random LLaVA to ``out`` (skipped when already there)."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=256,
    )
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def bench_image(seed: int = 0):
    """A deterministic 400x300 RGB image (the processor resizes it)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8))


def add_model_arguments(parser, image_size: int) -> None:
    """The options every medium-LLaVA benchmark takes: threads, image size, checkpoint folder."""
    from pathlib import Path as _Path

    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--model-dir", type=_Path, default=None, help="reuse/keep the random checkpoint here")


def medium_llava_folder(args) -> Path:
    """Set the thread count and build (or reuse) the checkpoint the parsed options name."""
    import tempfile

    torch.set_num_threads(args.threads)
    folder = args.model_dir or Path(tempfile.mkdtemp()) / "medium_llava"
    return build_medium_llava(folder, image_size=args.image_size)


def load_medium_llava(args, with_answer: bool = True):
    """The HookedVLM and the benchmark input (question, with its answer unless told not to)."""
    from vlens import HookedVLM

    folder = medium_llava_folder(args)
    model = HookedVLM.from_pretrained(folder, device="cpu")
    inputs = model.prepare(bench_image(), QUESTION, answer=ANSWER if with_answer else None)
    return folder, model, inputs


def load_plain_hf(folder: Path) -> LlavaForConditionalGeneration:
    """A second, untouched copy of the checkpoint: the plain Hugging Face baseline."""
    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def plain_hf_answer_loss(baseline, embeds, keep, answer, targets) -> torch.Tensor:
    """What a hand-written loop does for one knock-out variant.

    One plain Hugging Face forward on the kept positions of ``embeds`` (the row's merged
    input embeddings, ``[pos, d_model]``), logits at every position as the model returns
    them, then the mean cross-entropy of the answer tokens (``answer``: their positions in
    the full row, all kept; ``targets``: their ids).
    """
    kept = embeds[keep][None]
    out = baseline(inputs_embeds=kept, attention_mask=torch.ones(1, kept.shape[1], dtype=torch.long))
    new_index = keep.long().cumsum(0) - 1
    return torch.nn.functional.cross_entropy(out.logits[0, new_index[answer] - 1].float(), targets)
