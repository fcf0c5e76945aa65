"""MiniGPT-4: the original-format checkpoint converts, loads as a HookedVLM, and its
logits equal a reference forward written here from MiniGPT-4's own recipe:
ViT -> Q-Former -> llama_proj -> spliced between the prompt's embeddings -> Vicuna."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration, LlamaForCausalLM

from tests.parity.blip_checks import assert_language_model_alone_matches
from tests.parity.helpers import assert_batched_equals_unbatched, assert_generate_matches_hf, hf_reference, max_diff
from tests.tiny.minigpt4 import LLAMA_HIDDEN, N_QUERY, QFORMER_HIDDEN, build_minigpt4_parts, write_minigpt4_ckpt
from vlens import HookedVLM
from vlens.convert import CheckpointFormatError, convert_minigpt4
from vlens.convert.minigpt4 import main as convert_main


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_minigpt4_parts(tmp_path_factory.mktemp("minigpt4-parts"))


@pytest.fixture(scope="module")
def converted(parts, tmp_path_factory):
    out = convert_minigpt4(parts["minigpt4"], parts["blip2"], parts["vicuna"], tmp_path_factory.mktemp("minigpt4") / "hf")
    return out, HookedVLM.from_pretrained(out, device="cpu")


def minigpt4_reference_logits(parts, image, prompt: str, answer: str) -> torch.Tensor:
    """MiniGPT-4's forward (Vision-CAIR/MiniGPT-4: encode_img, then the prompt split at
    <ImageHere>), written from the three original parts, not from the converted model."""
    blip2 = Blip2ForConditionalGeneration.from_pretrained(parts["blip2"], attn_implementation="eager").eval()
    vicuna = LlamaForCausalLM.from_pretrained(parts["vicuna"], attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(parts["vicuna"])
    state = torch.load(parts["minigpt4"], weights_only=True)["model"]
    llama_proj = torch.nn.Linear(QFORMER_HIDDEN, LLAMA_HIDDEN)
    llama_proj.load_state_dict({"weight": state["llama_proj.weight"], "bias": state["llama_proj.bias"]})
    pixel_values = AutoImageProcessor.from_pretrained(parts["blip2"])(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeds = blip2.vision_model(pixel_values).last_hidden_state  # ln_vision(visual_encoder(image))
        query_tokens = blip2.query_tokens.expand(1, -1, -1)
        query_output = blip2.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        img_embeds = llama_proj(query_output)
        text = f"###Human: <Img><ImageHere></Img> {prompt}###Assistant: {answer}"
        before, after = text.split("<ImageHere>")
        before_ids = tokenizer(before, return_tensors="pt").input_ids  # with BOS
        after_ids = tokenizer(after, return_tensors="pt", add_special_tokens=False).input_ids
        embed = vicuna.get_input_embeddings()
        inputs_embeds = torch.cat([embed(before_ids), img_embeds, embed(after_ids)], dim=1)
        logits = vicuna(inputs_embeds=inputs_embeds).logits
    return logits, before_ids, after_ids


def test_logits_equal_the_minigpt4_recipe(parts, converted, photo):
    _, model = converted
    prompt, answer = "what is in the image ?", "a red circle ."
    inputs = model.prepare(photo, prompt, answer=answer)
    expected, before_ids, after_ids = minigpt4_reference_logits(parts, photo, prompt, answer)
    placeholder = model.hf_model.config.image_token_id
    ids = torch.cat([before_ids[0], torch.full((N_QUERY,), placeholder), after_ids[0]])
    assert torch.equal(inputs.input_ids[0], ids)
    with torch.no_grad():
        logits = model(inputs)
    diff = max_diff(logits, expected)
    assert diff <= 1e-4, f"MiniGPT-4 logits differ from the reference recipe by {diff}"


def test_layout_and_stage_hooks(converted, photo):
    _, model = converted
    inputs = model.prepare(photo, "what is in the image ?")
    (span,) = inputs.layout.images[0]
    start = len("<s> ### Human: <Img>".split())
    assert torch.equal(span.positions, torch.arange(start, start + N_QUERY))
    assert span.grid is None and span.labels[0] == "<q 0>" and span.query_attention.shape[0] == N_QUERY
    assert model.to_str_tokens(inputs)[start - 1 : start + N_QUERY + 1][::N_QUERY + 1] == ["<Img>", "</Img>"]
    assert inputs.layout.prefix_mask[0, :start].all()  # "###Human: <Img>" precedes the image
    names = [
        "vision_encoder.encoder_layers.1.attn.hook_pattern",
        "qformer.layers.0.cross_attn.hook_pattern",  # cross-attention every 2nd Q-Former layer
        "qformer.layers.1.hook_query_states",
        "vision_projector.hook_in",
        "vision_projector.hook_out",
        "blocks.1.attn.hook_pattern",
        "blocks.1.hook_resid_post",
    ]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
    assert cache["vision_projector.hook_out"].shape == (1, N_QUERY, LLAMA_HIDDEN)
    assert "qformer.layers.1.cross_attn.hook_pattern" not in model.hook_names()


def test_batched_equals_unbatched_and_generate_equals_hf(converted, photo, photo2):
    out, model = converted
    prompts = ["what is in the image ?", "describe"]
    batch = model.prepare([photo, photo2], prompts, answer=["a cat", "a big red circle on the left ."])
    singles = [model.prepare(photo, prompts[0], answer="a cat"), model.prepare(photo2, prompts[1], answer="a big red circle on the left .")]
    assert_batched_equals_unbatched(model, batch, singles)
    assert_generate_matches_hf(model, hf_reference(model, out), model.prepare(photo, "describe the image ."))


def test_chat_template_false_takes_the_placeholders_inline(converted, photo):
    _, model = converted
    templated = model.prepare(photo, "what is in the image ?")
    raw = model.prepare(photo, templated.texts[0], chat_template=False)
    assert torch.equal(raw.input_ids, templated.input_ids)


def test_language_model_alone_on_input_embeddings(converted, photo):
    _, model = converted
    assert_language_model_alone_matches(model, model.prepare(photo, "what is in the image ?", answer="a cat"))


# ---- bad checkpoints give one clear error ------------------------------------------------


def _convert(parts, ckpt, tmp_path):
    return convert_minigpt4(ckpt, parts["blip2"], parts["vicuna"], tmp_path / "out")


def test_missing_key_is_named(parts, tmp_path):
    ckpt = write_minigpt4_ckpt(tmp_path / "c.pth", torch.zeros(LLAMA_HIDDEN, QFORMER_HIDDEN), torch.zeros(LLAMA_HIDDEN))
    state = torch.load(ckpt, weights_only=True)
    del state["model"]["llama_proj.bias"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointFormatError, match=r"missing \['llama_proj.bias'\]"):
        _convert(parts, ckpt, tmp_path)


def test_misshaped_projection_is_named(parts, tmp_path):
    ckpt = write_minigpt4_ckpt(tmp_path / "c.pth", torch.zeros(LLAMA_HIDDEN + 1, QFORMER_HIDDEN), torch.zeros(LLAMA_HIDDEN + 1))
    with pytest.raises(CheckpointFormatError, match=r"'language_projection.weight' from llama_proj in c.pth has shape \[49, 32\], expected \[48, 32\]"):
        _convert(parts, ckpt, tmp_path)
    ckpt = write_minigpt4_ckpt(tmp_path / "d.pth", torch.zeros(LLAMA_HIDDEN, QFORMER_HIDDEN), torch.zeros(3))
    with pytest.raises(CheckpointFormatError, match=r"llama_proj.bias \(3,\)"):
        _convert(parts, ckpt, tmp_path)


def test_unexpected_tensor_is_named(parts, tmp_path):
    ckpt = write_minigpt4_ckpt(
        tmp_path / "c.pth", torch.zeros(LLAMA_HIDDEN, QFORMER_HIDDEN), torch.zeros(LLAMA_HIDDEN),
        **{"Qformer.bert.encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)},
    )
    with pytest.raises(CheckpointFormatError, match="Qformer.bert.encoder.layer.0.attention.self.query.weight"):
        _convert(parts, ckpt, tmp_path)


def test_corrupted_file_and_pickled_objects_are_refused(parts, tmp_path):
    corrupted = tmp_path / "corrupted.pth"
    corrupted.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        _convert(parts, corrupted, tmp_path)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        _convert(parts, pickled, tmp_path)


def test_cli_prints_one_line_not_a_stack_trace(parts, tmp_path, capsys):
    corrupted = tmp_path / "corrupted.pth"
    corrupted.write_bytes(b"garbage")
    code = convert_main(["--minigpt4", str(corrupted), "--blip2", str(parts["blip2"]), "--vicuna", str(parts["vicuna"]),
                         "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_vlens_convert_command_converts_and_reports_bad_checkpoints(parts, tmp_path, photo):
    from click.testing import CliRunner

    from vlens.cli import main as vlens_cli

    args = ["convert", "minigpt4", "--blip2", str(parts["blip2"]), "--vicuna", str(parts["vicuna"])]
    result = CliRunner().invoke(vlens_cli, [*args, "--minigpt4", str(parts["minigpt4"]), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    model = HookedVLM.from_pretrained(tmp_path / "ok", device="cpu")
    assert model.adapter.family == "blip2" and model.hf_model.config.text_config.model_type == "llama"
    bad = write_minigpt4_ckpt(tmp_path / "bad.pth", torch.zeros(LLAMA_HIDDEN, QFORMER_HIDDEN + 2), torch.zeros(LLAMA_HIDDEN))
    result = CliRunner().invoke(vlens_cli, [*args, "--minigpt4", str(bad), "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0
    assert "CheckpointFormatError" in result.output and "language_projection.weight" in result.output
    assert "Traceback" not in result.output
