"""HookedVLM's API on a tiny random LLaVA: names_filter forms, caches, hooks and every error."""

from __future__ import annotations

import json
import logging
import warnings

import PIL.Image
import pytest
import torch

from vlens import HookedVLM
from vlens.errors import (
    CheckpointNotFoundError,
    DeviceError,
    HookNameError,
    PromptError,
    UnsupportedArchitectureError,
)
from vlens.prepare import UnknownWordsWarning


@pytest.fixture(scope="module")
def inputs(llava_model, photo):
    return llava_model.prepare(photo, "what is in the image ?", answer="a red circle .")


def test_names_filter_forms(llava_model, inputs):
    n = llava_model.n_layers
    with torch.no_grad():
        _, one = llava_model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_post")
        _, glob = llava_model.run_with_cache(inputs, names_filter="blocks.*.hook_resid_post")
        _, listed = llava_model.run_with_cache(inputs, names_filter=["blocks.0.hook_resid_pre", "blocks.*.attn.hook_pattern"])
        _, pred = llava_model.run_with_cache(inputs, names_filter=lambda name: name.endswith("hook_mlp_out"))
    assert list(one.keys()) == ["blocks.1.hook_resid_post"]
    assert list(glob.keys()) == [f"blocks.{l}.hook_resid_post" for l in range(n)]
    assert set(listed.keys()) == {"blocks.0.hook_resid_pre", *[f"blocks.{l}.attn.hook_pattern" for l in range(n)]}
    assert all(k.endswith("hook_mlp_out") for k in pred.keys()) and len(pred.keys()) >= n


def test_alias_names_resolve_to_the_same_tensor(llava_model, inputs):
    with torch.no_grad():
        _, cache = llava_model.run_with_cache(inputs, names_filter="blocks.0.hook_in")
    # blocks.0.hook_in is the bridge's module-path name of blocks.0.hook_resid_pre.
    assert cache["blocks.0.hook_in"] is cache["blocks.0.hook_resid_pre"]
    assert cache["resid_pre", 0] is cache["blocks.0.hook_resid_pre"]


def test_full_cache_stores_each_tensor_once(llava_model, inputs):
    with torch.no_grad():
        _, cache = llava_model.run_with_cache(inputs)
    ptrs = [(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for t in cache.cache_dict.values()]
    assert len(ptrs) == len(set(ptrs)), "two cache entries alias the same tensor"
    # nbytes() counts each storage once: entries that are views of one buffer (this model caches some,
    # e.g. the projector's input is the vision output without its CLS row) do not count it twice ...
    values = list(cache.cache_dict.values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in values}
    assert len(storages) < len(values)
    assert cache.nbytes() == sum(storages.values())
    # ... and the cache keeps no buffer alive beyond the bytes of the tensors it stores.
    assert cache.nbytes() <= sum(t.nbytes for t in values)
    # Hook names that share a stored tensor still resolve.
    assert "blocks.0.ln1.hook_in" in cache and "blocks.0.hook_resid_pre" in cache
    assert "vision_encoder.encoder_layers.0.hook_resid_post" in cache
    assert "vision_projector.hook_out" in cache


def test_unknown_hook_names_list_close_ones(llava_model, inputs):
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_post") as err:
        llava_model.run_with_cache(inputs, names_filter="blocks.1.hook_resid_psot")
    assert isinstance(err.value, ValueError)
    with pytest.raises(HookNameError, match="matches no hook"):
        llava_model.run_with_cache(inputs, names_filter="blocks.*.hook_nothing")
    with pytest.raises(HookNameError, match="selected no hook"):
        llava_model.run_with_cache(inputs, names_filter=lambda name: False)
    with pytest.raises(HookNameError, match="never fire"):
        llava_model.run_with_cache(inputs, names_filter="blocks.0.hook_mlp_in")
    with pytest.raises(HookNameError, match="not in this cache"):
        _, cache = llava_model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_post")
        cache["blocks.1.hook_resid_post"]


def test_run_with_hooks_patches_and_cleans_up(llava_model, inputs):
    with torch.no_grad():
        clean = llava_model(inputs)
        seen = []

        def zero_image_features(tensor, hook):
            seen.append(hook.name)
            return torch.zeros_like(tensor)

        patched = llava_model.run_with_hooks(inputs, fwd_hooks=[("vision_projector.hook_out", zero_image_features)])
        after = llava_model(inputs)
    assert seen == ["vision_projector.hook_out"]
    assert not torch.allclose(clean, patched)
    assert torch.equal(clean, after), "a hook survived run_with_hooks"


def test_forward_refuses_arguments_it_does_not_take(llava_model, inputs):
    with pytest.raises(TypeError, match="'totally_bogus'") as err:
        llava_model(inputs, totally_bogus=3)
    assert "accepts only 'inputs'" in str(err.value)
    with pytest.raises(TypeError, match="'past_key_values'.*model.hf_model"):
        llava_model.forward(inputs, past_key_values=None)  # once passed on to Hugging Face unchecked
    with pytest.raises(TypeError):
        llava_model(inputs, 3)


def test_hook_names_by_stage(llava_model):
    vision = llava_model.hook_names("vision")
    language = llava_model.hook_names("language")
    assert vision and all(n.startswith("vision_encoder.") for n in vision)
    assert "blocks.0.hook_resid_post" in language
    with pytest.raises(HookNameError, match="unknown stage 'audio'"):
        llava_model.hook_names("audio")


def test_to_str_tokens_labels_image_tokens(llava_model, inputs):
    tokens = llava_model.to_str_tokens(inputs)
    assert len(tokens) == inputs.input_ids.shape[1]
    span = inputs.layout.images[0][0]
    assert tokens[int(span.positions[0])] == "<img 0,0>"
    assert tokens[int(span.positions[-1])] == f"<img {span.grid[0] - 1},{span.grid[1] - 1}>"
    assert tokens[-4:] == ["a", "red", "circle", "."]  # the answer's text kept verbatim
    assert "circle" in tokens


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda m, p: m.prepare(p, "<image> <image> what", chat_template=True), PromptError, "2 image placeholder"),
        (lambda m, p: m.prepare(p, "what is it ?", chat_template=False), PromptError, "0 image placeholder"),
        (lambda m, p: m.prepare([p, p], ["a", "b", "c"]), PromptError, "2 images but 3 prompts"),
        (lambda m, p: m.prepare([p], ["a"], answer=["x", "y"]), PromptError, "2 answers but 1 prompts"),
        (lambda m, p: m.prepare(p, "what", answer="  "), PromptError, "non-empty"),
        (lambda m, p: m.prepare(p, 5), PromptError, "int"),
        (lambda m, p: m.prepare(3.5, "what"), TypeError, "float"),
        (lambda m, p: m.prepare("/nonexistent/cat.png", "what"), ValueError, "does not exist"),
        (lambda m, p: m.prepare(PIL.Image.new("RGB", (0, 7)), "what"), TypeError, "size 0 x 7"),
    ],
)
def test_bad_inputs_raise_clear_errors(llava_model, photo, call, error, fragment):
    with pytest.raises(error) as err:
        call(llava_model, photo)
    assert fragment in str(err.value)


def test_no_image_is_a_text_only_row(llava_model, photo):
    inputs = llava_model.prepare(None, "what is in the image ?")
    assert inputs.layout.images == ((),) and inputs.pixel_values is None
    assert not bool(inputs.layout.image_mask.any())
    batch = llava_model.prepare([photo, []], ["what is in the image ?", "what is in the image ?"])
    assert batch.layout.images[1] == () and len(batch.layout.images[0]) == 1
    with torch.no_grad():
        alone, batched = llava_model(inputs), llava_model(batch)
    n = int(inputs.attention_mask.sum())
    assert torch.allclose(batched[1, :n], alone[0, :n], atol=1e-5)


def test_words_the_tokenizer_does_not_know_are_named(llava_model, photo):
    with pytest.warns(UnknownWordsWarning, match=r"\['animal', 'zebra'\].*'<unk>'.*get_vocab"):
        llava_model.prepare(photo, "what animal is in the image ?", answer="a zebra")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        llava_model.prepare(photo, "what is in the image ?", answer="a cat")


def test_an_offline_hub_id_fails_at_once(monkeypatch):
    import huggingface_hub.constants  # noqa: F401  (imported before the variable is set, as in a session)

    from vlens import loading

    def no_network(*args, **kwargs):
        raise AssertionError("no connection may be tried while HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(CheckpointNotFoundError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        HookedVLM.from_pretrained("someorg/not-cached-anywhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loading, "hub_reachable", lambda endpoint, timeout=3.0: False)
    with pytest.raises(CheckpointNotFoundError, match="cannot be reached"):
        HookedVLM.from_pretrained("someorg/not-cached-anywhere")


def test_bad_checkpoints(tmp_path, llava_dir):
    with pytest.raises(CheckpointNotFoundError, match="not an existing folder"):
        HookedVLM.from_pretrained(tmp_path / "missing" / "deeper" / "x")
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        HookedVLM.from_pretrained(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        HookedVLM.from_pretrained(tmp_path / "file.bin")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointNotFoundError, match="cannot read a model config"):
        HookedVLM.from_pretrained(broken)


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="LlavaForConditionalGeneration") as err:
        HookedVLM.from_pretrained(tmp_path)
    assert "GPT2" in str(err.value) or "gpt2" in str(err.value)


def test_unsupported_config_setting_is_refused(tmp_path, llava_dir):
    import shutil

    target = tmp_path / "odd"
    shutil.copytree(llava_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"] = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 50}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="text_config.model_type = 'gpt2'"):
        HookedVLM.from_pretrained(target)
    # A value transformers itself rejects still arrives as a vlens error naming it.
    config = json.loads((llava_dir / "config.json").read_text())
    config["vision_feature_select_strategy"] = "mean"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="mean"):
        HookedVLM.from_pretrained(target)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(dtype="float8"), "unknown dtype 'float8'"),
        (dict(dtype=torch.int8), "torch.int8"),
        (dict(device="tpu"), "'tpu'"),
        (dict(device="cuda:0"), "CUDA"),
        (dict(device="cpu", device_map="auto"), "not both"),
    ],
)
def test_bad_device_and_dtype(llava_dir, kwargs, fragment):
    if kwargs.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so cuda:0 is a valid device here")
    with pytest.raises(DeviceError) as err:
        HookedVLM.from_pretrained(llava_dir, **kwargs)
    assert fragment in str(err.value)


def test_transformers_logging_is_left_alone(llava_dir):
    logger = logging.getLogger("transformers")
    before = logger.level
    import vlens._tl  # noqa: F401  (the import TransformerLens lowers logging in)

    HookedVLM.from_pretrained(llava_dir, device="cpu")
    assert logger.level == before


def test_half_precision_loads_and_runs(llava_dir, photo, llava_model):
    half = HookedVLM.from_pretrained(llava_dir, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    inputs = half.prepare(photo, "what is in the image ?")
    with torch.no_grad():
        logits, cache = half.run_with_cache(inputs, names_filter="blocks.*.hook_resid_post")
        full = llava_model(inputs)
    assert logits.dtype == torch.bfloat16 and cache["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: the same model, not a bit-exact one.
    assert torch.allclose(logits.float(), full, atol=0.1, rtol=0.05)


def test_run_with_cache_can_store_half_precision(llava_model, inputs):
    with torch.no_grad():
        _, full = llava_model.run_with_cache(inputs, names_filter=["blocks.0.attn.hook_pattern", "embed.hook_in"])
        _, half = llava_model.run_with_cache(
            inputs, names_filter=["blocks.0.attn.hook_pattern", "embed.hook_in"], dtype=torch.float16
        )
    assert half["blocks.0.attn.hook_pattern"].dtype == torch.float16
    assert half["embed.hook_in"].dtype == full["embed.hook_in"].dtype  # token ids stay integers
    diff = (half["blocks.0.attn.hook_pattern"].float() - full["blocks.0.attn.hook_pattern"]).abs().max()
    assert float(diff) <= 1e-3


def test_a_model_and_a_result_describe_themselves(llava_model, inputs):
    text = repr(llava_model)
    for fragment in ("llava", f"{llava_model.n_layers} layers", f"d_model {llava_model.cfg.d_model}", "float32",
                     "cpu", f"language {len(llava_model.hook_names('language'))}"):
        assert fragment in text, (fragment, text)
    from vlens import analysis as va

    stream = va.AttentionStream(llava_model)
    stream.update(inputs)
    result = stream.last_batch
    assert "tensor(" not in repr(result) and f"mass=(1, {llava_model.n_layers}," in repr(result)
    assert "<table>" in result._repr_html_() and "<code>received</code>" in result._repr_html_()
