"""Comparisons against the Hugging Face model's own outputs, shared by the family parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from vlens import HookedVLM, VLMInputs

TOL = 1e-4


def hf_reference(model: HookedVLM, path: Path) -> torch.nn.Module:
    """A second, un-hooked copy of the checkpoint, loaded by Hugging Face with eager attention."""
    cls = type(model.hf_model)
    return cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def hooked_and_reference(path: Path) -> tuple[HookedVLM, torch.nn.Module]:
    """The checkpoint as a HookedVLM on the CPU, and Hugging Face's own copy beside it."""
    model = HookedVLM.from_pretrained(path, device="cpu")
    return model, hf_reference(model, path)


def hf_outputs(reference: torch.nn.Module, inputs: VLMInputs):
    with torch.no_grad():
        return reference(**inputs.model_kwargs(), output_hidden_states=True, output_attentions=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a.float() - b.float()).abs().max())


def assert_matches_hf(model: HookedVLM, reference: torch.nn.Module, inputs: VLMInputs) -> dict[str, float]:
    """Logits, per-layer residual streams and attention patterns equal HF's; returns the diffs."""
    out = hf_outputs(reference, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            inputs, names_filter=["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"]
        )
    diffs = {"logits": max_diff(logits, out.logits)}
    n_layers = model.n_layers
    hidden = out.hidden_states if out.hidden_states is not None else out.language_model_outputs.hidden_states
    attentions = out.attentions if out.attentions is not None else out.language_model_outputs.attentions
    assert len(hidden) == n_layers + 1
    # HF's last hidden state has the final norm applied; vlens's resid_post does not.
    for layer in range(n_layers - 1):
        diffs[f"resid_post.{layer}"] = max_diff(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    for layer in range(n_layers):
        diffs[f"pattern.{layer}"] = max_diff(cache[f"blocks.{layer}.attn.hook_pattern"], attentions[layer])
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"differs from Hugging Face beyond {TOL}: {bad}"
    return diffs


def assert_batched_equals_unbatched(model: HookedVLM, batch: VLMInputs, singles: list[VLMInputs]) -> None:
    with torch.no_grad():
        batched = model(batch)
        for row, single in enumerate(singles):
            alone = model(single)
            n = int(single.attention_mask.sum())
            assert torch.equal(batch.input_ids[row, :n], single.input_ids[0, :n])
            diff = max_diff(batched[row, :n], alone[0, :n])
            assert diff <= TOL, f"row {row}: batched logits differ from unbatched by {diff}"


def greedy_without_cache(
    reference: torch.nn.Module, kwargs: dict, n: int, grow: Optional[dict[str, int]] = None
) -> torch.Tensor:
    """The reference generation no cache can spoil: the untouched Hugging Face model re-run on
    the whole sequence at every step (``use_cache=False``), taking the argmax of the last logits.

    Every per-token input (``attention_mask``, ``token_type_ids``, ...: a ``[1, pos]`` tensor
    beside ``input_ids``) grows with the sequence: 1 in the attention mask, 0 (a text token)
    elsewhere, as Hugging Face's own generation extends them, unless ``grow`` names another
    value (PaliGemma's generated tokens are suffix tokens, ``token_type_ids`` 1).
    """
    grow = {"attention_mask": 1, **(grow or {})}
    ids = kwargs["input_ids"]
    per_token = {k: v for k, v in kwargs.items() if k != "input_ids" and torch.is_tensor(v) and v.shape == ids.shape}
    fixed = {k: v for k, v in kwargs.items() if k != "input_ids" and k not in per_token}
    new = []
    for _ in range(n):
        with torch.no_grad():
            logits = reference(input_ids=ids, **per_token, **fixed, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(token))
        ids = torch.cat([ids, token], 1)
        per_token = {
            k: torch.cat([v, torch.full_like(v[:, :1], grow.get(k, 0))], 1)
            for k, v in per_token.items()
        }
    return torch.tensor(new)


def assert_generate_matches_hf(
    model: HookedVLM, reference: torch.nn.Module, inputs: VLMInputs, n: int = 6, grow: Optional[dict[str, int]] = None
) -> None:
    """vlens's greedy tokens equal a no-cache greedy loop over the untouched HF model (the
    reference that cannot share a cache bug; ``grow`` as there) and, beside it, Hugging Face's
    own ``generate``."""
    kwargs = inputs.model_kwargs()
    plain = greedy_without_cache(reference, kwargs, n, grow)
    with torch.no_grad():
        ref = reference.generate(**kwargs, max_new_tokens=n, do_sample=False, num_beams=1,
                                 pad_token_id=model.tokenizer.pad_token_id)
    hf_generate = ref[0, kwargs["input_ids"].shape[1]:]
    got = model.generate(inputs, max_new_tokens=n).tokens[0]
    # Generation stops early at an end-of-sequence token; the loop above never stops.
    stopped = len(got) < n and int(got[-1]) == model.tokenizer.eos_token_id
    assert len(got) == n or stopped, f"vlens generated {len(got)} of {n} tokens: {got.tolist()}"
    assert torch.equal(got, plain[: len(got)]), (
        f"vlens generated {got.tolist()}, the no-cache greedy loop {plain.tolist()}"
    )
    assert torch.equal(got, hf_generate), f"vlens generated {got.tolist()}, HF generate {hf_generate.tolist()}"


BATCH_PROMPTS = ("what is in the image ?", "describe the image .")
BATCH_ANSWERS = ("a red circle .", "a big blue square on the left .")


def batch_and_singles(model: HookedVLM, images: list) -> tuple[VLMInputs, list[VLMInputs]]:
    """A two-row batch whose rows differ in length, and each row prepared alone."""
    batch = model.prepare(list(images), list(BATCH_PROMPTS), answer=list(BATCH_ANSWERS))
    singles = [model.prepare(img, p, answer=a) for img, p, a in zip(images, BATCH_PROMPTS, BATCH_ANSWERS)]
    assert batch.attention_mask[1].sum() != batch.attention_mask[0].sum()  # rows really differ in length
    return batch, singles
