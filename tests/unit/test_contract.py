"""The family contract: the base class refuses every fact a family has not stated, the 1-D
positions rule, and the token engine deciding from adapter facts alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlens.adapters import ADAPTERS
from vlens.adapters.base import VisionPrefixAdapter
from vlens.adapters.contract import FACTS, SceneGeometry, SequentialPositions
from vlens.analysis.knockout import engine_for
from vlens.errors import UnstatedFactError, UnsupportedArchitectureError


class SilentAdapter(VisionPrefixAdapter):
    """A family that states nothing beyond what every adapter must have to exist."""

    family = "silent"
    hf_architectures = ("SilentForConditionalGeneration",)
    tl_architecture = "SilentForConditionalGeneration"

    def image_spans(self, batch, row, positions):
        return []


class OneDAdapter(SequentialPositions, SilentAdapter):
    family = "oned"


def bare(cls):
    """An instance without a config or processor (the facts under test read neither)."""
    return object.__new__(cls)


def test_the_base_class_states_no_fact():
    assert SilentAdapter.unstated_facts() == list(FACTS)
    assert OneDAdapter.unstated_facts() == ["per_token_inputs", "causal_over_image", "token_boxes", "scene_geometry"]


@pytest.mark.parametrize("fact", ["per_token_inputs", "causal_over_image"])
def test_an_unstated_attribute_raises_naming_family_and_fact(fact):
    for owner in (SilentAdapter, bare(SilentAdapter)):
        with pytest.raises(UnstatedFactError, match=rf"silent adapter \(SilentAdapter\) does not state `{fact}`"):
            getattr(owner, fact)
    # The error is both kinds a caller may catch; never an AttributeError, which getattr(..., default) would hide.
    assert issubclass(UnstatedFactError, UnsupportedArchitectureError)
    assert issubclass(UnstatedFactError, NotImplementedError)
    assert not issubclass(UnstatedFactError, AttributeError)


@pytest.mark.parametrize(
    "fact, call",
    [
        ("positions_after_removal", lambda a: a.positions_after_removal(torch.arange(3), torch.ones(3).bool())),
        ("text_positions", lambda a: a.text_positions(2, torch.device("cpu"))),
        ("positions_source", lambda a: a.positions_source(torch.nn.Linear(1, 1))),
        ("read_positions", lambda a: a.read_positions((), {}, 1)),
        ("token_boxes", lambda a: a.token_boxes(None, (8, 8))),
        ("scene_geometry", lambda a: a.scene_geometry()),
    ],
)
def test_an_unstated_method_raises_naming_family_and_fact(fact, call):
    with pytest.raises(UnstatedFactError, match=rf"silent adapter .* does not state `{fact}`"):
        call(bare(SilentAdapter))


def test_every_registered_adapter_states_every_fact():
    for adapter in ADAPTERS:
        assert adapter.unstated_facts() == [], adapter.family
        assert isinstance(adapter.per_token_inputs, tuple) and isinstance(adapter.causal_over_image, bool)


def test_one_d_positions_renumber_the_kept_tokens():
    adapter = bare(OneDAdapter)
    keep = torch.tensor([True, False, True, True, False, True])
    new = adapter.positions_after_removal(torch.arange(6), keep)
    assert new.tolist() == [0, 1, 2, 3]
    # The kv engine's suffix after a prefix reused up to the first removed position (1).
    assert new[1:].tolist() == [1, 2, 3]
    assert adapter.text_positions(3, torch.device("cpu")).tolist() == [0, 1, 2]
    with pytest.raises(UnsupportedArchitectureError, match="oned: the language model numbered this row"):
        adapter.positions_after_removal(torch.tensor([0, 1, 5, 6, 7, 8]), keep)
    positions = adapter.read_positions((), {"position_ids": torch.arange(4)[None]}, batch_size=3)
    assert positions.shape == (3, 4)
    with pytest.raises(UnsupportedArchitectureError, match="without 2-D position_ids"):
        adapter.read_positions((), {}, batch_size=1)


def stub_model(**facts):
    adapter = SimpleNamespace(family="stub", causal_over_image=True, per_token_inputs=(), attention_window=None)
    for name, value in facts.items():
        setattr(adapter, name, value)
    return SimpleNamespace(adapter=adapter)


def test_the_token_engine_reads_only_adapter_facts():
    run = engine_for(stub_model(causal_over_image=False), 10, "kv")
    assert (run.engine, run.reason) == ("naive", "the stub language model is not causal over the image")
    run = engine_for(stub_model(per_token_inputs=("types",)), 10, "kv")
    assert run.engine == "naive" and "per-token inputs ['types']" in run.reason
    run = engine_for(stub_model(attention_window=4), 10, "kv")
    assert run.engine == "naive" and "sliding-window" in run.reason
    assert engine_for(stub_model(causal_over_image=False), 10, "naive").reason == ""
    with pytest.raises(UnstatedFactError, match="causal_over_image"):
        engine_for(SimpleNamespace(adapter=bare(SilentAdapter)), 10, "kv")


def test_scene_geometry_is_whole_cells():
    assert SceneGeometry(64, 8, (8, 8)).scene_kwargs() == {"image_size": 64, "patch_size": 8}
    with pytest.raises(ValueError, match="whole number"):
        SceneGeometry(60, 8, (8, 8))
