"""Mistral3 / Pixtral parity: vlens equals Hugging Face's own Mistral3ForConditionalGeneration,
and the layout (one grid per image at its own size, row markers that are text tokens) says
where each token came from."""

from __future__ import annotations

import pytest
import torch

from tests.parity.helpers import (
    assert_batched_equals_unbatched,
    assert_generate_matches_hf,
    assert_matches_hf,
    batch_and_singles,
    hooked_and_reference,
)
from tests.tiny.mistral3 import build_mistral3

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hooked_and_reference(build_mistral3(tmp_path_factory.mktemp("mistral3")))


def test_logits_hidden_states_and_patterns_equal_hf(tiny, photo):
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT, answer="a red circle .")
    assert_matches_hf(model, reference, inputs)


def test_layout_matches_the_features_hf_scatters(tiny, photo, photo2):
    """Independent of the layout arithmetic: the image tokens hold HF's own projected features
    of their image, in order, on a grid of image_sizes // (patch * merge); the row markers are
    the vocabulary's [IMG_BREAK] / [IMG_END] embeddings, not image features."""
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "[IMG] [IMG] " + PROMPT)
    config = model.hf_model.config
    cell = config.vision_config.patch_size * config.spatial_merge_size
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
        features = reference.model.get_image_features(
            inputs.pixel_values, inputs.extras["image_sizes"], vision_feature_layer=-1
        ).pooler_output
        vocab = reference.get_input_embeddings().weight
    embeds = cache["blocks.0.hook_resid_pre"][0]
    tokenizer = model.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("[IMG_BREAK]", "[IMG_END]")}
    for span, feats, size in zip(inputs.layout.images[0], features, inputs.extras["image_sizes"]):
        assert span.grid == (int(size[0]) // cell, int(size[1]) // cell)
        assert torch.allclose(embeds[span.positions], feats, atol=1e-6)
        rows = span.grid[0]
        assert span.marker_labels == tuple(f"<nl {r}>" for r in range(rows))
        marker_ids = inputs.input_ids[0, span.marker_positions]
        assert marker_ids.tolist() == [ids["[IMG_BREAK]"]] * (rows - 1) + [ids["[IMG_END]"]]
        assert torch.allclose(embeds[span.marker_positions], vocab[marker_ids], atol=1e-6)
        assert bool(inputs.layout.marker_mask[0, span.marker_positions].all())
        assert not bool(inputs.layout.image_mask[0, span.marker_positions].any())
        assert not bool(inputs.layout.instruction_mask[0, span.marker_positions].any())
    # The two images keep their own sizes: 61 x 43 -> 56 x 42 px (3 x 4 tokens), 40 x 52 -> 42 x 56 (4 x 3).
    assert [s.grid for s in inputs.layout.images[0]] == [(3, 4), (4, 3)]
    labels = model.to_str_tokens(inputs)
    first = inputs.layout.images[0][0]
    assert labels[int(first.positions[3]) + 1] == "<nl 0>" and labels[int(first.positions[-1]) + 1] == "<nl 2>"


def test_two_images_in_one_prompt_equal_hf(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "[IMG] [IMG] " + PROMPT, answer="a cat")
    assert_matches_hf(model, reference, inputs)


def test_batched_equals_unbatched_with_mixed_image_sizes(tiny, photo, photo2):
    model, reference = tiny
    batch, singles = batch_and_singles(model, [photo, photo2])
    # Pixel tensors are padded to the batch's largest image; image_sizes keep the real sizes.
    assert batch.pixel_values.shape[-2:] == (56, 56)
    assert batch.extras["image_sizes"].tolist() == [[42, 56], [56, 42]]
    assert batch.layout.images[0][0].grid != batch.layout.images[1][0].grid
    assert_batched_equals_unbatched(model, batch, singles)
    assert_matches_hf(model, reference, batch)
    for row, single in enumerate(singles):
        assert torch.equal(batch.layout.images[row][0].positions, single.layout.images[0][0].positions)
        assert torch.equal(batch.layout.images[row][0].marker_positions, single.layout.images[0][0].marker_positions)


def test_greedy_generate_equals_hf(tiny, photo2):
    model, reference = tiny
    inputs = model.prepare(photo2, "describe the image .")
    assert_generate_matches_hf(model, reference, inputs, n=5)


def test_pixtral_layer_hooks_fire_with_hfs_own_states(tiny, photo, photo2):
    """TransformerLens leaves the Pixtral tower opaque; vlens maps its layers
    (``vlens.adapters._pixtral_bridge``): each layer's residual stream equals HF's own
    ``hidden_states`` of the tower, the patch convolution its conv output, for two images of
    different sizes run as one sequence of patches."""
    model, reference = tiny
    inputs = model.prepare([photo, photo2], "[IMG] [IMG] " + PROMPT)
    n_layers = model.hf_model.config.vision_config.num_hidden_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda name: name.startswith("vision_encoder"))
        tower = reference.model.vision_tower(
            inputs.pixel_values, image_sizes=inputs.extras["image_sizes"], output_hidden_states=True
        )
        conv = reference.model.vision_tower.patch_conv(inputs.pixel_values)
    assert len(tower.hidden_states) == n_layers + 1
    n_patches = sum(int(h) // 7 * (int(w) // 7) for h, w in inputs.extras["image_sizes"])
    assert cache["vision_encoder.encoder_layers.0.hook_resid_pre"].shape == (1, n_patches, 32)
    for layer in range(n_layers):
        assert torch.allclose(cache[f"vision_encoder.encoder_layers.{layer}.hook_resid_pre"], tower.hidden_states[layer])
        assert torch.allclose(cache[f"vision_encoder.encoder_layers.{layer}.hook_resid_post"], tower.hidden_states[layer + 1])
    assert torch.allclose(cache["vision_encoder.hook_out"], tower.last_hidden_state)
    assert torch.allclose(cache["vision_encoder.patch_conv.hook_out"], conv)


def test_an_edit_at_a_pixtral_hook_changes_the_output_as_in_hf(tiny, photo):
    """Shifting layer 0's MLP output through vlens equals the same edit by a plain forward hook
    on HF's own module, in the tower's output and in the logits: the hooks sit where the
    tower computes, they are not copies."""
    model, reference = tiny
    inputs = model.prepare(photo, PROMPT)
    seen = {}

    def shift(tensor, hook=None):
        return tensor + 1.0  # the random tiny MLP's own output is ~1e-3: a shift shows

    def keep(tensor, hook=None):
        seen["tower"] = tensor.detach().clone()

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[
            ("vision_encoder.encoder_layers.0.hook_mlp_out", shift), ("vision_encoder.hook_out", keep),
        ])
        tower = reference.model.vision_tower
        plain = tower(inputs.pixel_values, image_sizes=inputs.extras["image_sizes"]).last_hidden_state
        handle = tower.transformer.layers[0].feed_forward.register_forward_hook(lambda _m, _a, out: out + 1.0)
        try:
            edited = tower(inputs.pixel_values, image_sizes=inputs.extras["image_sizes"]).last_hidden_state
            theirs = reference(**inputs.model_kwargs()).logits
        finally:
            handle.remove()
    assert float((seen["tower"] - edited).abs().max()) <= 1e-5
    assert float((edited - plain).abs().max()) > 0.1  # the edit matters
    assert float((ours - theirs).abs().max()) <= 1e-5
