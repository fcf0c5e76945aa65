"""PaliGemma / PaliGemma 2 parity: vlens equals Hugging Face's own PaliGemmaForConditionalGeneration,
the answer is the prefix-LM's suffix (never prompt text), and the layout's grid and boxes are
the tower's patches."""

from __future__ import annotations

import copy
import warnings

import PIL.Image
import pytest
import torch

from tests.conftest import make_photo
from tests.parity.helpers import (
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    batch_and_singles,
    greedy_without_cache,
    hooked_and_reference,
    max_diff,
)
from tests.tiny.paligemma import build_paligemma
from vlens import analysis as va
from vlens.adapters.paligemma import PaliGemmaAdapter
from vlens.errors import PromptError, UnsupportedArchitectureError

VARIANTS = {"paligemma": dict(gemma2=False), "paligemma2": dict(gemma2=True)}
PROMPT, ANSWER = "what is in the image ?", "a red circle on the left ."


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = build_paligemma(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return hooked_and_reference(path)


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT, answer=ANSWER)
    window = getattr(model.hf_model.config.text_config, "sliding_window", None)
    if window is not None:  # PaliGemma 2: the local layers really mask
        assert inputs.input_ids.shape[1] > window
    assert_matches_hf(model, reference, inputs)


def test_the_processor_format_and_the_answer_as_suffix(tiny, photo):
    model, _ = tiny
    tok = model.tokenizer
    inputs = model.prepare(photo, PROMPT, answer=ANSWER)
    n = model.adapter.tokens_per_image
    ids = inputs.input_ids[0].tolist()
    words = tok.convert_ids_to_tokens(ids[n:])
    # <image>*n <bos> prompt \n, then the answer and the <eos> the processor's suffix appends.
    assert ids[:n] == [model.adapter.image_token_id] * n
    assert words == ["<bos>", *PROMPT.split(), "\n", *ANSWER.split(), "<eos>"]
    types = inputs.extras["token_type_ids"][0]
    assert torch.equal(types.bool(), inputs.layout.answer_mask[0])  # exactly the answer is suffix
    assert int(inputs.layout.answer_start[0]) == n + 1 + len(PROMPT.split()) + 1
    assert inputs.texts == ("<image>" + PROMPT,)  # no newline between the image and the prompt
    # The processor's 1,024 location and 128 segmentation tokens are in the vocabulary the model reads.
    vocab = tok.get_vocab()
    extra = [t for t in vocab if (t.startswith("<loc") or t.startswith("<seg")) and t.endswith(">")]
    assert len(extra) == 1152 and {"<loc0000>", "<loc1023>", "<seg000>", "<seg127>"} <= set(extra)
    assert len(tok) == model.hf_model.config.text_config.vocab_size == model.cfg.d_vocab


def test_prefix_is_bidirectional_and_suffix_causal(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT, answer=ANSWER)
    types = getattr(model.hf_model.config.text_config, "layer_types", None) or ["full_attention"]
    layer = types.index("full_attention")  # PaliGemma 2's sliding layers see only the last 24 tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
    prefix = (~inputs.extras["token_type_ids"][0].bool()).nonzero().flatten()
    suffix = inputs.layout.answer_mask[0].nonzero().flatten()
    first_image, last_prompt = int(prefix[0]), int(prefix[-1])
    # An image token reads the prompt after it; no prefix token reads the suffix.
    assert float(pattern[:, first_image, last_prompt].min()) > 0
    assert float(pattern[:, prefix][:, :, suffix].abs().max()) == 0.0
    # A suffix token reads the whole prefix and earlier suffix tokens only.
    a = int(suffix[1])
    assert float(pattern[:, a, : a + 1].min()) > 0 and float(pattern[:, a, a + 1 :].abs().max()) == 0.0
    # Appending the answer to the prompt text would make it prefix, and change what the model computes.
    kwargs = inputs.model_kwargs()
    as_prefix = dict(kwargs, token_type_ids=torch.zeros_like(kwargs["token_type_ids"]))
    with torch.no_grad():
        assert max_diff(reference(**kwargs).logits, reference(**as_prefix).logits) > 1e-3


def test_layout_grid_matches_the_patches_hf_scatters(tiny, photo):
    """Independent of the layout: the token at (r, c) is the projection of the tower's patch
    r * side + c."""
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT)
    (span,) = inputs.layout.images[0]
    g = model.adapter.grid_side
    assert span.grid == (g, g) and torch.equal(span.positions, torch.arange(g * g))
    seen = {}
    handle = reference.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.update(x=out))
    try:
        with torch.no_grad():
            reference(**inputs.model_kwargs())
            _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
    finally:
        handle.remove()
    embeds = cache["blocks.0.hook_resid_pre"][0, span.positions]
    for k, (r, c) in enumerate(span.row_col.tolist()):
        assert torch.allclose(embeds[k], seen["x"][0, r * g + c], atol=1e-6), span.labels[k]
    bos = model.tokenizer.bos_token_id
    assert inputs.layout.marker_mask[0].nonzero().flatten().tolist() == [g * g]
    assert int(inputs.input_ids[0, g * g]) == bos


def test_token_box_is_the_patch_the_processor_cuts(tiny):
    """A white rectangle drawn exactly on one token's box is, in the pixel values the tower
    reads, that token's patch and no other (the image is an integer multiple of the tower's
    square, so the resize puts the rectangle on whole patches)."""
    model, _ = tiny
    side = model.hf_model.config.vision_config.image_size
    patch = model.hf_model.config.vision_config.patch_size
    width, height = 2 * side, 3 * side
    probe = PIL.Image.new("RGB", (width, height))
    (span,) = model.prepare(probe, PROMPT).layout.images[0]
    k = int(((span.row_col[:, 0] == 3) & (span.row_col[:, 1] == 2)).nonzero())
    x0, y0, x1, y1 = span.boxes[k].tolist()
    assert (x0, y0, x1, y1) == (2 * patch * 2, 3 * patch * 3, 3 * patch * 2, 4 * patch * 3)
    probe.paste((255, 255, 255), (int(x0), int(y0), int(x1), int(y1)))
    pixels = model.prepare(probe, PROMPT).pixel_values[0].mean(0)  # [side, side]
    cells = pixels[: span.grid[0] * patch, : span.grid[1] * patch].unfold(0, patch, patch).unfold(1, patch, patch)
    brightness = cells.mean(dim=(-1, -2)).flatten()
    order = brightness.argsort(descending=True)
    assert int(order[0]) == 3 * span.grid[1] + 2
    assert float(brightness[order[0]] - brightness[order[1]]) > 1.0  # others at most catch the resize's blur


def test_batched_equals_unbatched_with_mixed_image_sizes(tiny, photo):
    model, _ = tiny
    wide = make_photo(width=90, height=30, seed=5)
    batch, singles = batch_and_singles(model, [photo, wide])
    assert_batched_equals_unbatched(model, batch, singles)
    for row, single in enumerate(singles):
        n = int(single.attention_mask.sum())
        assert torch.equal(batch.extras["token_type_ids"][row, :n], single.extras["token_type_ids"][0])


def test_a_row_without_answer_is_the_prompt_alone(tiny, photo, photo2):
    model, _ = tiny
    batch = model.prepare([photo, photo2], [PROMPT, "describe the image ."], answer=[ANSWER, None])
    alone = model.prepare(photo2, "describe the image .")
    n = int(alone.attention_mask.sum())
    assert int(batch.attention_mask[1].sum()) == n
    assert torch.equal(batch.input_ids[1, :n], alone.input_ids[0])
    assert not batch.extras["token_type_ids"][1].any() and not batch.layout.answer_mask[1].any()
    assert_batched_equals_unbatched(model, batch, [model.prepare(photo, PROMPT, answer=ANSWER), alone])


def test_greedy_generate_equals_hf_with_generated_tokens_as_suffix(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT)
    assert_generate_matches_hf(model, reference, inputs, n=6, grow={"token_type_ids": 1})
    if model.hf_model.config.text_config.model_type == "gemma2":
        # This input tells the two apart: generated tokens typed as prefix would continue differently.
        # (The tiny Gemma 1 tower repeats one token whatever the types, so it cannot show it.)
        kwargs = inputs.model_kwargs()
        as_prefix = greedy_without_cache(reference, kwargs, 6, {"token_type_ids": 0})
        assert not torch.equal(as_prefix, greedy_without_cache(reference, kwargs, 6, {"token_type_ids": 1}))


def test_two_images_in_one_row_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], PROMPT, answer="a red circle .")
    spans = inputs.layout.images[0]
    n = model.adapter.tokens_per_image
    assert [s.image_index for s in spans] == [0, 1]
    assert torch.equal(spans[1].positions, torch.arange(n, 2 * n))
    assert_matches_hf(model, reference, inputs)


def test_kv_engine_falls_back_as_the_contract_expects(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, PROMPT, answer=ANSWER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an expected fallback does not warn
        curve = va.token_count_curve(model, inputs, counts=[0, 8, 16], engine="kv")
    assert curve.engine == "naive"
    assert "not causal over the image" in curve.engine_reason


def test_prompts_the_prefix_format_cannot_hold_are_refused(tiny, photo, photo2):
    model, _ = tiny
    with pytest.raises(PromptError, match="at the very start"):
        model.prepare([photo, photo2], "compare <image> and <image> .")
    with pytest.raises(PromptError, match="'<bos>'"):
        model.prepare(photo, "<bos> what is it ?")
    with pytest.raises(PromptError, match="start the prompt with one '<image>'"):
        model.prepare(photo, PROMPT, chat_template=False)
    with pytest.raises(PromptError, match="at least one image"):
        model.prepare([photo, []], [PROMPT, PROMPT])
    assert model.prepare(photo, "<image>" + PROMPT, chat_template=False).texts == ("<image>" + PROMPT,)


def test_config_settings_the_adapter_does_not_handle_are_refused(tiny):
    model, _ = tiny
    config = copy.deepcopy(model.hf_model.config)
    config.text_config.model_type = "gemma3_text"
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.text_config\.model_type = 'gemma3_text'"):
        PaliGemmaAdapter.check_config(config)
    config = copy.deepcopy(model.hf_model.config)
    config.vision_config.model_type = "clip_vision_model"
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.vision_config\.model_type"):
        PaliGemmaAdapter.check_config(config)
    processor = copy.deepcopy(model.processor)
    processor.image_seq_length = 10
    with pytest.raises(UnsupportedArchitectureError, match="image_seq_length"):
        PaliGemmaAdapter(model.hf_model.config, processor)
