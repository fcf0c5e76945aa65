"""MiniGPT-4 as a Hugging Face ``Blip2ForConditionalGeneration`` checkpoint.

MiniGPT-4 (Zhu et al., 2023) is BLIP-2's ViT and Q-Former, one linear layer
``llama_proj`` (Q-Former width -> Vicuna width) and Vicuna. Its authors publish only
``llama_proj``, as a ``.pth`` whose ``model`` dict holds ``llama_proj.weight`` and
``llama_proj.bias`` (MiniGPT-4 loads it with ``load_state_dict(ckpt['model'],
strict=False)`` over the frozen BLIP-2 and Vicuna weights). That is exactly
``Blip2ForConditionalGeneration`` with a Llama tower, ``llama_proj`` as
``language_projection``, so the converter writes one:

    vision_model.*, qformer.*, query_tokens   from the BLIP-2 folder (any tower: MiniGPT-4
                                              used the Flan-T5-XXL BLIP-2's)
    language_projection.{weight,bias}         llama_proj from the .pth
    language_model.*                          the Vicuna folder's model.* and lm_head.*

The image placeholder is Vicuna's ``<unk>``, which no text tokenizes to, so the
vocabulary and the language model stay byte-identical to MiniGPT-4's (logits equal its
own). The processor has no ``num_query_tokens``: its chat template writes the
placeholders where MiniGPT-4 splices the image,
``###Human: <Img>[32 x <unk>]</Img> {prompt}###Assistant:``.

Assumptions: the ``.pth`` follows the released MiniGPT-4 (v1) format above; a
checkpoint holding any other tensor (a fine-tuned Q-Former, LoRA weights) is refused
by name rather than silently dropped. The original tokenizes the text before and after
``<ImageHere>`` separately; a whole-string tokenization can differ from it at those two
boundaries for some sentencepiece tokenizers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from vlens.convert import CheckpointFormatError
from vlens.errors import CheckpointNotFoundError

PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
BLIP2_PREFIXES = ("vision_model.", "qformer.", "query_tokens")
LLAMA_PREFIXES = ("model.", "lm_head.")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}###Human: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<Img>{{ image_placeholder * num_query_tokens }}</Img> "
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %}###Assistant: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}###Assistant:{% endif %}"
)


def chat_template(image_placeholder: str, num_query_tokens: int) -> str:
    """MiniGPT-4's prompt (``###Human: <Img><ImageHere></Img> ...###Assistant:``) as a
    chat template with the placeholders expanded."""
    return (
        "{% set image_placeholder = " + json.dumps(image_placeholder) + " %}"
        "{% set num_query_tokens = " + str(int(num_query_tokens)) + " %}" + CHAT_TEMPLATE
    )


def convert_minigpt4(
    minigpt4_ckpt: Union[str, os.PathLike],
    blip2_dir: Union[str, os.PathLike],
    vicuna_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
) -> Path:
    """Write MiniGPT-4 as a ``Blip2ForConditionalGeneration`` checkpoint that
    ``HookedVLM.from_pretrained(out_dir)`` (and Hugging Face) loads.

    Args:
        minigpt4_ckpt: The MiniGPT-4 ``.pth`` (``{"model": {"llama_proj.weight", "llama_proj.bias"}, ...}``),
            read with ``torch.load(..., weights_only=True)``.
        blip2_dir: A Hugging Face BLIP-2 folder; its vision model, Q-Former, query
            tokens and image processor are used.
        vicuna_dir: A Hugging Face Llama/Vicuna folder (``LlamaForCausalLM`` weights,
            config and tokenizer).
        out_dir: Where to write the checkpoint (created; must not hold a checkpoint yet).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CheckpointNotFoundError: a path is missing or is not the kind of folder/file expected.
        CheckpointFormatError: a tensor is missing, mis-shaped or unexpected (named in the message).
    """
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
    )

    ckpt_path, blip2_path, vicuna_path, out_path = (Path(p).expanduser() for p in (minigpt4_ckpt, blip2_dir, vicuna_dir, out_dir))
    _check_folder(blip2_path, ("blip-2",), "--blip2")
    _check_folder(vicuna_path, ("llama",), "--vicuna")
    if (out_path / "config.json").exists():
        raise CheckpointNotFoundError(f"output folder {str(out_path)!r} already holds a checkpoint; pick an empty folder")

    tokenizer = AutoTokenizer.from_pretrained(vicuna_path)
    placeholder_id = tokenizer.unk_token_id
    if placeholder_id is None or placeholder_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise CheckpointFormatError(
            f"the tokenizer in {str(vicuna_path)!r} has no <unk> token distinct from BOS/EOS to stand for the image "
            "(Vicuna's has one); this converter expects a Llama/Vicuna sentencepiece tokenizer"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == placeholder_id:
        tokenizer.pad_token = tokenizer.eos_token  # as MiniGPT-4 does; padding must not read as image

    blip2 = AutoConfig.from_pretrained(blip2_path)
    llama = AutoConfig.from_pretrained(vicuna_path)
    config = Blip2Config(
        vision_config=blip2.vision_config.to_dict(),
        qformer_config=blip2.qformer_config.to_dict(),
        text_config=llama.to_dict(),
        num_query_tokens=blip2.num_query_tokens,
        image_token_index=placeholder_id,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]

    with torch.device("meta"):
        skeleton = Blip2ForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    state: dict[str, Optional[torch.Tensor]] = {}  # None: missing, which _check_against reports
    proj = _read_minigpt4(ckpt_path)
    state["language_projection.weight"] = proj["llama_proj.weight"]
    state["language_projection.bias"] = proj["llama_proj.bias"]
    state.update(_folder_tensors(blip2_path, BLIP2_PREFIXES, "--blip2"))
    state.update({"language_model." + k: v for k, v in _folder_tensors(vicuna_path, LLAMA_PREFIXES, "--vicuna").items()})
    if getattr(llama, "tie_word_embeddings", False) and "language_model.lm_head.weight" not in state:
        state["language_model.lm_head.weight"] = state.get("language_model.model.embed_tokens.weight")
    _check_against(state, expected, sources={
        "language_projection.": f"llama_proj in {ckpt_path.name}",
        "language_model.": f"the Vicuna folder {str(vicuna_path)!r}",
        "": f"the BLIP-2 folder {str(blip2_path)!r}",
    })

    skeleton.load_state_dict(state, strict=True, assign=True)
    out_path.mkdir(parents=True, exist_ok=True)
    skeleton.save_pretrained(out_path)
    processor = Blip2Processor(
        image_processor=AutoImageProcessor.from_pretrained(blip2_path),
        tokenizer=tokenizer,
        num_query_tokens=None,  # the chat template places the placeholders inline
    )
    # Blip2Processor.__init__ drops a chat_template argument; set it on the instance.
    processor.chat_template = chat_template(tokenizer.convert_ids_to_tokens(placeholder_id), blip2.num_query_tokens)
    processor.save_pretrained(out_path)
    return out_path


def _check_folder(folder: Path, model_types: tuple[str, ...], flag: str) -> None:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{flag} {str(folder)!r} is not a Hugging Face model folder (no config.json)")
    config = json.loads(path.read_text())
    if config.get("model_type") not in model_types:
        raise CheckpointFormatError(
            f"{flag} {str(folder)!r} holds a {config.get('model_type')!r} model; expected {list(model_types)}"
        )


def _read_minigpt4(path: Path) -> dict[str, torch.Tensor]:
    """``llama_proj`` from a MiniGPT-4 ``.pth``, checked for keys, types and rank."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"--minigpt4 {str(path)!r} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common base class
        raise CheckpointFormatError(
            f"cannot read {str(path)!r} as a MiniGPT-4 checkpoint with torch.load(weights_only=True): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a MiniGPT-4 checkpoint dict")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{str(path)!r}: its 'model' entry is a {type(state).__name__}, not a state dict")
    missing = [k for k in PROJ_KEYS if k not in state]
    if missing:
        raise CheckpointFormatError(
            f"{str(path)!r} is missing {missing}; a MiniGPT-4 checkpoint's 'model' dict holds {list(PROJ_KEYS)} "
            f"(found: {sorted(state)[:8]})"
        )
    unexpected = sorted(k for k in state if k not in PROJ_KEYS)
    if unexpected:
        raise CheckpointFormatError(
            f"{str(path)!r} holds tensors besides llama_proj: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
            "this converter handles the released MiniGPT-4 checkpoints, which hold only llama_proj"
        )
    for key in PROJ_KEYS:
        if not isinstance(state[key], torch.Tensor) or not state[key].is_floating_point():
            raise CheckpointFormatError(f"{str(path)!r}: {key} is not a floating-point tensor")
    weight, bias = state["llama_proj.weight"], state["llama_proj.bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointFormatError(
            f"{str(path)!r}: llama_proj.weight has shape {tuple(weight.shape)} and llama_proj.bias "
            f"{tuple(bias.shape)}; expected [llm_hidden, qformer_hidden] and [llm_hidden]"
        )
    return {"llama_proj.weight": weight, "llama_proj.bias": bias}


def _folder_tensors(folder: Path, prefixes: tuple[str, ...], flag: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face folder whose names start with one of ``prefixes``
    (safetensors read lazily; ``.bin`` files with ``weights_only=True``)."""
    files = _weight_files(folder, flag)
    out: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefixes):
                        out[key] = handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def _weight_files(folder: Path, flag: str) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointNotFoundError(f"{flag} {str(folder)!r} holds no model.safetensors or pytorch_model.bin weights")


def _check_against(state: dict[str, Any], expected: dict[str, tuple], sources: dict[str, str]) -> None:
    """Raise naming every missing or mis-shaped tensor and where it should have come from."""

    def source(key: str) -> str:
        return next(where for prefix, where in sources.items() if key.startswith(prefix))

    missing = [k for k in expected if state.get(k) is None]
    if missing:
        raise CheckpointFormatError(
            f"missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} (expected from {source(missing[0])})"
        )
    bad = [(k, tuple(state[k].shape), shape) for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if bad:
        key, got, want = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointFormatError(
            f"tensor {key!r} from {source(key)} has shape {list(got)}, expected {list(want)}{more}: the BLIP-2, "
            "Vicuna and MiniGPT-4 parts do not fit together"
        )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointFormatError(f"unexpected tensor(s) {extra[:8]} (from {source(extra[0])})")


# ---- command line -----------------------------------------------------------------------


def add_minigpt4_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """``minigpt4 --minigpt4 CKPT.pth --blip2 DIR --vicuna DIR --out DIR`` (sets ``func``)."""
    parser = subparsers.add_parser(
        "minigpt4",
        help="MiniGPT-4 (.pth + BLIP-2 + Vicuna) -> a Blip2ForConditionalGeneration checkpoint",
        description=(__doc__ or "").split("\n\n")[0],  # no docstring under python -OO
    )
    parser.add_argument("--minigpt4", required=True, metavar="CKPT.pth", help="MiniGPT-4 checkpoint (llama_proj)")
    parser.add_argument("--blip2", required=True, metavar="DIR", help="Hugging Face BLIP-2 folder")
    parser.add_argument("--vicuna", required=True, metavar="DIR", help="Hugging Face Vicuna/Llama folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    out = convert_minigpt4(args.minigpt4, args.blip2, args.vicuna, args.out)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vlens.convert.minigpt4 --minigpt4 ... --blip2 ... --vicuna ... --out ...``.

    vlens errors are printed as one line (exit status 1), not as a stack trace.
    """
    from vlens.errors import VLensError

    parser = argparse.ArgumentParser(prog="vlens convert")
    add_minigpt4_parser(parser.add_subparsers(dest="kind", required=True))
    args = parser.parse_args(["minigpt4", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except VLensError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
