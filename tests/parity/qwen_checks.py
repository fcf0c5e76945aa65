"""Parity checks shared by the Qwen-VL family tests (Qwen2-VL, Qwen2.5-VL): vlens against
Hugging Face's own model (fp32, eager), on images of different sizes and aspect ratios.

The references here are Hugging Face's: its logits, hidden states and attentions, its
``get_rope_index`` positions, its ``image_grid_thw`` and its generation, never the adapter's
rules.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from tests.conftest import make_photo
from tests.parity.helpers import (
    TOL,
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    max_diff,
)
from vlens import HookedVLM
from vlens import analysis as va
from vlens.errors import PromptError

PROMPT = "what is in the image ?"
TWO_IMAGES = "what is in <|image_pad|> and <|image_pad|> ?"
WIDE = make_photo(width=90, height=30, seed=5)


def rope_index(reference: torch.nn.Module, inputs) -> torch.Tensor:
    """Hugging Face's own M-RoPE positions of a batch, ``[batch, 3, pos]``."""
    kw = inputs.model_kwargs()
    with torch.no_grad():
        positions, _ = reference.model.get_rope_index(
            kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"), attention_mask=kw["attention_mask"]
        )
    return positions.permute(1, 0, 2)


def check_equals_hf(model: HookedVLM, reference: torch.nn.Module, photo: PIL.Image.Image) -> None:
    for image in (photo, WIDE):
        inputs = model.prepare(image, PROMPT, answer="a red circle on the left .")
        assert_matches_hf(model, reference, inputs)


def check_forward_needs_token_types_and_vlens_passes_them(model: HookedVLM, reference: torch.nn.Module, photo) -> None:
    inputs = model.prepare(photo, PROMPT)
    kwargs = inputs.model_kwargs()
    assert torch.equal(kwargs["mm_token_type_ids"], (inputs.input_ids == model.hf_model.config.image_token_id).long())
    without = {k: v for k, v in kwargs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        with_them = reference(**kwargs).logits
        try:  # Qwen2-VL raises without them; others number the tokens without the image grid
            wrong = reference(**without).logits
        except ValueError as err:
            assert "mm_token_type_ids" in str(err)
        else:
            assert max_diff(wrong, with_them) > 1e-3
        ours = model(inputs)
    assert max_diff(ours, with_them) <= TOL


def check_layout(
    model: HookedVLM, reference: torch.nn.Module, photo: PIL.Image.Image, photo2: PIL.Image.Image
) -> None:
    """Spans and grids from ``image_grid_thw``; markers around each run; labels; and the
    positions Hugging Face gives each token: (p, p + r, p + c) at grid cell (r, c), with the
    text after the image resuming at p + max(rows, cols)."""
    config = model.hf_model.config
    merge = config.vision_config.spatial_merge_size
    inputs = model.prepare([photo, WIDE], TWO_IMAGES)
    ids = inputs.input_ids[0]
    spans = inputs.layout.images[0]
    grids = inputs.extras["image_grid_thw"]
    assert len(spans) == 2 == grids.shape[0]
    assert torch.equal(torch.cat([s.positions for s in spans]), (ids == config.image_token_id).nonzero().flatten())
    labels = model.to_str_tokens(inputs)
    positions = rope_index(reference, inputs)[0]
    for span, (t, h, w) in zip(spans, grids.tolist()):
        assert t == 1 and span.grid == (h // merge, w // merge) and span.n_tokens == h * w // merge**2
        first, last = int(span.positions[0]), int(span.positions[-1])
        assert int(ids[first - 1]) == config.vision_start_token_id and int(ids[last + 1]) == config.vision_end_token_id
        for k in (0, 1, span.n_tokens - 1):
            r, c = span.row_col[k].tolist()
            assert labels[int(span.positions[k])] == f"<img {r},{c}>"
        p = int(positions[0, first])
        assert p == int(positions[0, first - 1]) + 1
        r, c = span.row_col[:, 0], span.row_col[:, 1]
        assert torch.equal(positions[:, span.positions], torch.stack([torch.full_like(r, p), p + r, p + c]))
        assert int(positions[0, last + 1]) == p + max(span.grid)  # <|vision_end|>
    markers = inputs.layout.marker_mask[0]
    assert set(ids[markers].tolist()) == {config.vision_start_token_id, config.vision_end_token_id}
    assert int(markers.sum()) == 4
    assert not bool((inputs.layout.instruction_mask | inputs.layout.prefix_mask)[0, markers].any())


def check_batched_equals_unbatched(model: HookedVLM, photo, photo2) -> None:
    images = [photo, [photo2, WIDE], WIDE]
    prompts = [PROMPT, TWO_IMAGES, "describe the image ."]
    answers = ["a red circle .", "a big blue square on the left .", "a cat"]
    batch = model.prepare(images, prompts, answer=answers)
    singles = [model.prepare(img, p, answer=a) for img, p, a in zip(images, prompts, answers)]
    grids = [tuple(s.grid) for row in batch.layout.images for s in row]
    assert len(set(grids)) == 3, grids  # three different grids in one batch
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # rows really differ in length
    assert_batched_equals_unbatched(model, batch, singles)
    lm = model.input_embeddings(batch)
    for row, single in enumerate(singles):
        n = int(single.attention_mask.sum())
        assert torch.equal(lm.position_ids[row, :, :n], model.input_embeddings(single).position_ids[0])


def check_generate(model: HookedVLM, reference: torch.nn.Module, photo2) -> None:
    for image in (photo2, WIDE):
        assert_generate_matches_hf(model, reference, model.prepare(image, "describe the image ."), n=5)


def check_language_model_alone(model: HookedVLM, reference: torch.nn.Module, photo) -> None:
    """The language model on the captured embeddings and positions gives Hugging Face's logits,
    even after a call on another input left stale ``rope_deltas`` cached in the model."""
    inputs = model.prepare(photo, PROMPT, answer="a red circle .")
    with torch.no_grad():
        expected = reference(**inputs.model_kwargs()).logits
        model(model.prepare(WIDE, "describe the image ."))  # caches other rope_deltas
        lm = model.input_embeddings(inputs)
        logits, _ = model.run_language_model(
            lm.embeds, lm.position_ids, attention_mask=lm.attention_mask, extras=lm.extras
        )
    assert max_diff(logits, expected) <= TOL
    # Everything kept: the count curve's full loss is Hugging Face's own forward's.
    answer = inputs.layout.answer_mask[0].nonzero().flatten()
    ce = float(torch.nn.functional.cross_entropy(expected[0, answer - 1], inputs.input_ids[0, answer]))
    curve = va.token_count_curve(model, inputs, counts=[0, 8])
    assert curve.engine == ("naive" if model.adapter.per_token_inputs else "kv")  # DeepStack: per-token inputs
    assert abs(float(curve.full_loss[0]) - ce) <= TOL


def check_bad_inputs(model: HookedVLM, photo) -> None:
    with pytest.raises(PromptError, match="video"):
        model.prepare(photo, "what is in <|video_pad|> ?")
    with pytest.raises(PromptError, match="400x1 px"):
        model.prepare(PIL.Image.new("RGB", (400, 1)), PROMPT)


def check_heatmap_lands_on_the_token_box(model: HookedVLM) -> None:
    """On a resized non-square image, a value on one token colours exactly that token's box of
    the input image (the boxes themselves are checked against the processor's pixels in
    tests/unit/test_token_boxes.py)."""
    import numpy as np

    from vlens.viz import model_view_image, overlay

    for image in (WIDE, make_photo(width=37, height=71, seed=2)):
        inputs = model.prepare(image, PROMPT)
        (span,) = inputs.layout.images[0]
        view = model_view_image(inputs, model.processor)
        assert view.size == image.size  # the grid covers the whole (resized) image
        k = span.n_tokens // 2 + 1
        values = torch.zeros(span.n_tokens)
        values[k] = 1.0
        px = np.asarray(overlay(span.to_grid(values), view, alpha=1.0, min_side=0), dtype=float)
        hot = np.abs(px - px[int(span.boxes[k, 1] + span.boxes[k, 3]) // 2, int(span.boxes[k, 0] + span.boxes[k, 2]) // 2])
        ys, xs = np.nonzero(hot.max(-1) < 1)
        x0, y0, x1, y1 = span.boxes[k].tolist()
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1, (xs.min(), xs.max(), span.boxes[k])
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1, (ys.min(), ys.max(), span.boxes[k])


def check_deepstack(model: HookedVLM, reference: torch.nn.Module, photo) -> None:
    """Qwen3-VL's DeepStack, against Hugging Face's own vision tower and forward.

    The layer axis is the decoder layers' outputs (``blocks.{l}.hook_resid_post`` = HF's
    ``hidden_states[l + 1]``, checked in check_equals_hf); the stream the next layer reads,
    ``blocks.{l+1}.hook_resid_pre``, is that plus DeepStack feature l at the image positions.
    """
    inputs = model.prepare(photo, PROMPT, answer="a red circle .")
    kwargs = inputs.model_kwargs()
    levels = len(model.hf_model.config.vision_config.deepstack_visual_indexes)
    assert 0 < levels < model.n_layers
    with torch.no_grad():
        features = reference.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True)
        features = [torch.cat(list(level)) for level in features.deepstack_features]
        _, cache = model.run_with_cache(inputs, names_filter=["blocks.*.hook_resid_post", "blocks.*.hook_resid_pre"])
        expected = reference(**kwargs).logits
        dropped = reference(inputs_embeds=model.input_embeddings(inputs).embeds, attention_mask=kwargs["attention_mask"],
                            position_ids=rope_index(reference, inputs).permute(1, 0, 2)).logits
    image = inputs.layout.image_mask[0]
    for layer in range(model.n_layers - 1):
        added = cache[f"blocks.{layer + 1}.hook_resid_pre"][0] - cache[f"blocks.{layer}.hook_resid_post"][0]
        want = torch.zeros_like(added)
        if layer < levels:
            want[image] = features[layer]
        assert max_diff(added, want) <= TOL, f"layer {layer}"
    # Hugging Face's whole model on input embeddings silently drops DeepStack; vlens's language
    # model on them keeps it (and refuses to run without the features).
    assert max_diff(dropped, expected) > 1e-3
    lm = model.input_embeddings(inputs)
    with torch.no_grad():
        logits, _ = model.run_language_model(lm.embeds, lm.position_ids, lm.attention_mask, extras=lm.extras)
    assert max_diff(logits, expected) <= TOL
    with pytest.raises(ValueError, match="DeepStack"):
        model.run_language_model(lm.embeds, lm.position_ids, lm.attention_mask)
    lens = va.logit_lens(model, cache, positions="image", k=1)
    assert lens.top_ids.shape[1] == model.n_layers + 1
