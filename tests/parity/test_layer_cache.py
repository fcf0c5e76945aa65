"""A key/value cache that the language model does not fill is found and reported, never used.

The condition is forced the way transformers 5.24 caused it under TransformerLens 4.3: the
attention components of the language model stop receiving their layer cache, so a cached
forward leaves every layer empty while each full forward stays exact.
"""

from __future__ import annotations

import pytest
import torch

from vlens import HookedVLM
from vlens import analysis as va
from vlens._compat import layer_cache_problem
from vlens.analysis.knockout import EngineFallbackWarning

CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")


def _withhold_layer_cache(model: HookedVLM) -> list:
    def drop(_module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}

    return [block.attn.register_forward_pre_hook(drop, with_kwargs=True) for block in model.bridge.blocks]


@pytest.fixture()
def starved(llava_dir):
    model = HookedVLM.from_pretrained(llava_dir, device="cpu")  # fresh: the probe's answer is kept per model
    handles = _withhold_layer_cache(model)
    yield model
    for handle in handles:
        handle.remove()


def test_a_working_cache_passes_the_probe(llava_model):
    assert layer_cache_problem(llava_model) is None


def test_the_probe_reports_an_unfilled_cache(starved):
    problem = layer_cache_problem(starved)
    assert problem is not None and "not filled" in problem, problem
    assert "transformers" in problem  # names the versions installed


def test_token_engines_fall_back_with_the_reason_and_a_warning(starved, photo):
    inputs = starved.prepare(photo, "what is in the image ?", answer="a red circle .")
    naive = va.token_count_curve(starved, inputs, counts=[0, 3, 8], engine="naive")
    with pytest.warns(EngineFallbackWarning, match="not filled"):
        kv = va.token_count_curve(starved, inputs, counts=[0, 3, 8], engine="kv")
    assert kv.engine == "naive" and "not filled" in kv.engine_reason
    assert torch.allclose(kv.loss, naive.loss, atol=1e-6)  # the losses the fallback gives stay exact


def test_the_engine_checks_the_cache_it_got_even_when_the_probe_passed(starved, photo):
    starved._layer_cache_problem = None  # as if the probe had seen a working cache
    inputs = starved.prepare(photo, "what is in the image ?", answer="a red circle .")
    with pytest.warns(EngineFallbackWarning, match="positions per layer"):
        drop = va.token_contributions(starved, inputs, estimator="drop", engine="kv")
    assert drop.engine == "naive" and "positions per layer" in drop.engine_reason


def test_generate_refuses_rather_than_answering_wrongly(starved, photo):
    with pytest.raises(RuntimeError, match="cannot generate.*not filled"):
        starved.generate(starved.prepare(photo, "describe the image ."), max_new_tokens=3)
