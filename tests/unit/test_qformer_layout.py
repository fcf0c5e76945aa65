"""Layout of Q-Former images: query tokens with no grid, their attention maps over the
patch grid, the instruction InstructBLIP's Q-Former read, and what the adapters refuse."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    T5Config,
)

from tests.parity.blip_checks import qformer_forward
from tests.parity.helpers import hf_reference
from tests.tiny.blip import N_QUERY, blip_tokenizer, build_blip2, build_instructblip, _image_processor
from vlens import HookedVLM
from vlens.adapters.blip import query_span
from vlens.errors import PromptError, UnsupportedArchitectureError


@pytest.fixture(scope="module", params=["blip2", "instructblip"])
def tiny(request, tmp_path_factory):
    build = build_blip2 if request.param == "blip2" else build_instructblip
    path = build(tmp_path_factory.mktemp(request.param))
    model = HookedVLM.from_pretrained(path, device="cpu")
    return model, hf_reference(model, path)


def test_query_tokens_have_labels_and_no_grid(tiny, photo):
    model, _ = tiny
    inputs = model.prepare(photo, "what is in the image ?", answer="a cat")
    (span,) = inputs.layout.images[0]
    assert span.grid is None and span.tile_grids == {}
    assert span.labels == tuple(f"<q {k}>" for k in range(N_QUERY))
    assert torch.equal(span.row_col, torch.full((N_QUERY, 2), -1))
    # HF's BLIP processors put the queries first, before BOS.
    assert torch.equal(span.positions, torch.arange(N_QUERY))
    assert torch.equal(inputs.layout.image_positions(0), torch.arange(N_QUERY))
    assert not inputs.layout.prefix_mask.any()
    labels = model.to_str_tokens(inputs)
    assert labels[:N_QUERY] == [f"<q {k}>" for k in range(N_QUERY)] and labels[-2:] == ["a", "cat"]
    assert int(inputs.layout.instruction_mask.sum()) > 0


def test_query_attention_equals_hf_cross_attention(tiny, photo, photo2):
    model, reference = tiny
    inputs = model.prepare([photo, photo2], ["what is in the image ?", "what"])
    kwargs = inputs.model_kwargs()
    with torch.no_grad():
        image_embeds = reference.vision_model(kwargs["pixel_values"]).last_hidden_state
        cross = qformer_forward(reference, kwargs, image_embeds).cross_attentions
    vision = reference.config.vision_config
    side = vision.image_size // vision.patch_size
    # mean over cross-attention layers and heads; drop the CLS key; lay out on the patch grid
    expected = torch.stack(cross).mean(dim=(0, 2))[:, :N_QUERY, 1:].reshape(2, N_QUERY, side, side)
    for row in range(2):
        got = inputs.layout.images[row][0].query_attention
        assert got.shape == (N_QUERY, side, side)
        assert float((got - expected[row]).abs().max()) <= 1e-6
    # the maps differ between queries (the tiny model is not degenerate)
    assert float(expected[0].std(0).max()) > 1e-3


def test_to_grid_spreads_query_values_over_their_attention(tiny, photo):
    model, _ = tiny
    span = model.prepare(photo, "what").layout.images[0][0]
    ones = span.to_grid(torch.ones(N_QUERY))
    assert torch.allclose(ones, torch.ones_like(ones))
    one_hot = torch.zeros(N_QUERY)
    one_hot[2] = 1.0
    expected = span.query_attention[2] / span.query_attention.sum(0)
    assert torch.allclose(span.to_grid(one_hot), expected)


def test_qformer_text_is_recorded_for_instructblip_only(tiny, photo):
    model, _ = tiny
    span = model.prepare(photo, "describe the image .", answer="a cat").layout.images[0][0]
    if model.adapter.family == "instructblip":
        assert span.connector_text == "describe the image ."
    else:
        assert span.connector_text is None


def test_prompts_the_adapter_refuses(tiny, photo):
    model, _ = tiny
    with pytest.raises(PromptError, match="query tokens before the text"):
        model.prepare(photo, "<image> what is in the image ?")
    with pytest.raises(PromptError, match="exactly one image"):
        model.prepare([photo, photo], "what")


def test_query_span_checks_the_count():
    with pytest.raises(PromptError, match="3 placeholder tokens"):
        query_span(0, torch.arange(3), n_query=4)


def test_adapters_registered_with_transformer_lens():
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    from vlens.adapters._qformer_bridge import TL_ARCHITECTURES

    for name, adapter in TL_ARCHITECTURES.items():
        assert ArchitectureAdapterFactory._adapters[name] is adapter


def test_encoder_decoder_tower_is_refused(tmp_path):
    tokenizer = blip_tokenizer()
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=28, patch_size=7).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64).to_dict(),
        text_config=T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                             num_heads=4, decoder_start_token_id=0).to_dict(),
        num_query_tokens=N_QUERY,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)
    Blip2Processor(image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=N_QUERY).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder.*not supported|not supported.*encoder-decoder"):
        HookedVLM.from_pretrained(tmp_path, device="cpu")


def test_processor_of_a_tokenizer_declaring_image_token_is_repaired(tmp_path, photo):
    from transformers import AutoProcessor

    path = build_blip2(tmp_path, declare_image_token=True)
    raw = AutoProcessor.from_pretrained(path)
    assert isinstance(raw.image_token, str)
    with pytest.raises(AttributeError, match="content"):  # Hugging Face's own failure
        raw(images=[photo], text=["what"], return_tensors="pt")
    model = HookedVLM.from_pretrained(path, device="cpu")
    inputs = model.prepare(photo, "what is in the image ?")
    assert torch.equal(inputs.layout.images[0][0].positions, torch.arange(N_QUERY))
