"""Layouts of LLaVA-NeXT, Idefics3 and Gemma3 in unusual cases, and the configs they refuse.

No weights: each case writes a tiny config and processor (``save_model=False``) and builds
the family adapter from them, exactly as ``HookedVLM.from_pretrained`` does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    LlamaConfig,
    LlavaNextConfig,
    MistralConfig,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tests.conftest import make_photo
from tests.tiny.gemma3 import build_gemma3
from tests.tiny.idefics3 import build_idefics3
from tests.tiny.llava_next import build_llava_next
from vlens.adapters import adapter_for
from vlens.adapters.gemma3 import Gemma3Adapter
from vlens.adapters.idefics3 import Idefics3Adapter
from vlens.adapters.llava_next import LlavaNextAdapter, anyres_canvas
from vlens.errors import PromptError, UnsupportedArchitectureError
from vlens.loading import load_config, load_processor
from vlens.prepare import prepare_batch


def make_adapter(path):
    config = load_config(str(path))
    return adapter_for(config)(config, load_processor(str(path)))


@pytest.fixture(scope="module")
def wide():
    return make_photo(width=90, height=30, seed=5)


@pytest.fixture(scope="module")
def tall():
    return make_photo(width=24, height=70, seed=6)


# ---- LLaVA-NeXT -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_adapter(tmp_path_factory):
    return make_adapter(build_llava_next(tmp_path_factory.mktemp("next"), save_model=False))


@pytest.mark.parametrize("size", [(43, 61), (52, 40), (30, 90), (90, 30), (56, 56), (10, 100), (28, 28)])
@pytest.mark.parametrize("pinpoints", [[[28, 56], [56, 28], [56, 56]], [[28, 84], [84, 28], [28, 28]]])
def test_anyres_canvas_follows_hf_unpad_image(size, pinpoints):
    """Index the packed canvas with HF's own unpad_image: the kept cells, their tiles and the
    number of newline rows must match the layout's."""
    g, tower = 4, 28
    height, width = size
    canvas = anyres_canvas(height, width, pinpoints, tower, 7)
    tiles_h, tiles_w = get_anyres_image_grid_shape([height, width], pinpoints, tower)
    cells = torch.arange(tiles_h * g * tiles_w * g).reshape(1, tiles_h * g, tiles_w * g)
    kept = unpad_image(cells, [height, width])[0]
    tile = torch.tensor(canvas.tile)
    assert torch.equal(tile[: g * g], torch.zeros(g * g, dtype=torch.long))
    assert int((tile == -1).sum()) == kept.shape[0]
    rows, cols = kept // (tiles_w * g), kept % (tiles_w * g)
    # (10 x 100 px on a 1 x 2 canvas keeps no row at all: HF truncates the unpadded height to 0.)
    want = torch.cat(
        [torch.cat([(rows[r] // g) * tiles_w + cols[r] // g + 1, torch.tensor([-1])]) for r in range(kept.shape[0])]
        or [torch.empty(0, dtype=torch.long)]
    )
    assert torch.equal(tile[g * g :], want)
    for t, (n_rows, n_cols) in canvas.tile_grids.items():
        assert int((tile == t).sum()) == n_rows * n_cols


def test_next_counts_agree_with_the_processor(next_adapter):
    processor = next_adapter.processor
    for height, width in [(43, 61), (52, 40), (30, 90), (70, 24)]:
        hf_count = processor._get_number_of_features(height, width, 28, 28) - 1  # strategy "default"
        assert next_adapter.canvas(torch.tensor([height, width])).n_tokens == hf_count


def test_next_two_adjacent_images_in_one_row_and_a_second_row(next_adapter, photo, photo2, wide, tall):
    prompts = ["<image> <image> what is in the image ?", "what <image> is in the image ?"]
    images = [[photo, wide], [tall]]
    inputs = prepare_batch(next_adapter, images, prompts, None, True)
    row0, row1 = inputs.layout.images
    assert len(row0) == 2 and len(row1) == 1
    # The two images' tokens are adjacent: one run, split by the anyres counts.
    assert int(row0[1].positions[0]) == int(row0[0].positions[-1]) + 1
    sizes = inputs.extras["image_sizes"]
    for span, size in zip([*row0, *row1], sizes):
        assert span.n_tokens == next_adapter.canvas(size).n_tokens
    # Wide image: a 1 x 2 tile canvas with columns kept whole; tall image: 2 x 1.
    assert sorted(row0[1].tile_grids) == [0, 1, 2]
    assert sorted(row1[0].tile_grids) == [0, 1, 2]
    assert row0[1].tile_grids[1][1] == 4 and row1[0].tile_grids[1][0] == 4
    assert row0[1].labels[16] == "<t1 0,0>" and "<nl 0>" in row0[1].labels


def test_next_text_only_rows(next_adapter, tall):
    inputs = prepare_batch(next_adapter, [[], [tall]], ["what is in the image ?", "what ?"], None, True)
    assert inputs.layout.images[0] == ()
    (span,) = inputs.layout.images[1]
    assert span.n_tokens == next_adapter.canvas(inputs.extras["image_sizes"][0]).n_tokens
    text_only = prepare_batch(next_adapter, [], "what is in the image ?", None, True)
    assert text_only.layout.images == ((),) and text_only.extras == {}


def test_next_refuses_a_miscounted_prompt(tmp_path):
    path = build_llava_next(tmp_path, save_model=False)
    config = load_config(str(path))
    config.vision_config.patch_size = 14  # the processor still counts 7-pixel patches
    adapter = LlavaNextAdapter(config, load_processor(str(path)))
    with pytest.raises(PromptError, match="anyres layout"):
        prepare_batch(adapter, make_photo(), "what is in the image ?", None, True)


def next_config(**overrides):
    kwargs = dict(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=28, patch_size=7),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        image_grid_pinpoints=[[28, 56], [56, 28]],
    )
    kwargs.update(overrides)
    config = LlavaNextConfig(**kwargs)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    return config


def test_next_accepts_its_tiny_config():
    LlavaNextAdapter.check_config(next_config())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy='full'"),
        (dict(text_config=GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, head_dim=8)), "model_type = 'gemma'"),
        (dict(image_grid_pinpoints=[[30, 60]]), "image_grid_pinpoints"),
    ],
)
def test_next_refuses_configs_it_does_not_handle(overrides, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        LlavaNextAdapter.check_config(next_config(**overrides))


# ---- Idefics3 / SmolVLM -----------------------------------------------------------------


@pytest.fixture(scope="module")
def idefics3_adapter(tmp_path_factory):
    return make_adapter(build_idefics3(tmp_path_factory.mktemp("idefics3"), save_model=False))


def test_idefics3_two_images_in_one_row(idefics3_adapter, photo, wide):
    inputs = prepare_batch(idefics3_adapter, [[photo, wide], [wide]], ["<image> <image> what", "what"], None, True)
    row0, row1 = inputs.layout.images
    assert [len(s.tile_grids) for s in row0] == [5, 3] and [len(s.tile_grids) for s in row1] == [3]
    g = 4
    for span in (*row0, *row1):
        assert span.grid == (g, g)
        assert span.n_tokens == g * g * len(span.tile_grids)
        # Crops come first in the sequence, the global image (tile 0) last.
        assert span.tile[0] == 1 and span.tile[-1] == 0
    ids = inputs.input_ids[0]
    expected = (ids == idefics3_adapter.image_token_id).nonzero().flatten()
    assert torch.equal(torch.cat([s.positions for s in row0]), expected)
    # The second image's tags restart at <row_1_col_1>.
    tok = idefics3_adapter.tokenizer.convert_ids_to_tokens
    assert tok(int(ids[row0[1].positions[0] - 1])) == "<row_1_col_1>"


def test_idefics3_without_splitting_has_only_the_global_image(tmp_path, photo):
    adapter = make_adapter(build_idefics3(tmp_path, do_image_splitting=False, save_model=False))
    inputs = prepare_batch(adapter, photo, "what is in the image ?", None, True)
    (span,) = inputs.layout.images[0]
    assert span.tile_grids == {0: (4, 4)} and span.labels[0] == "<img 0,0>"


def test_idefics3_needs_row_col_tokens_only_when_it_splits(tmp_path, photo):
    with pytest.raises(UnsupportedArchitectureError, match="<row_i_col_j>"):
        make_adapter(build_idefics3(tmp_path / "split", max_grid=0, save_model=False))
    adapter = make_adapter(build_idefics3(tmp_path / "whole", max_grid=0, do_image_splitting=False, save_model=False))
    (span,) = prepare_batch(adapter, photo, "what ?", None, True).layout.images[0]
    assert span.tile_grids == {0: (4, 4)}


def test_idefics3_refuses_a_wrong_image_seq_len(tmp_path, photo):
    adapter = make_adapter(build_idefics3(tmp_path, save_model=False))
    adapter.processor.image_seq_len = 9
    with pytest.raises(PromptError, match="image_seq_len"):
        prepare_batch(adapter, photo, "what is in the image ?", None, True)


def test_idefics3_refuses_a_processor_that_disagrees_with_the_tower(tmp_path):
    path = build_idefics3(tmp_path, save_model=False)
    processor = load_processor(str(path))
    processor.image_processor.max_image_size = {"longest_edge": 28}
    with pytest.raises(UnsupportedArchitectureError, match="28px crops"):
        Idefics3Adapter(load_config(str(path)), processor)


def test_idefics3_refuses_a_non_llama_text_tower():
    config = Idefics3Config(text_config=MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4).to_dict())
    config.architectures = ["Idefics3ForConditionalGeneration"]
    with pytest.raises(UnsupportedArchitectureError, match="'mistral'"):
        Idefics3Adapter.check_config(config)


# ---- Gemma3 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return build_gemma3(tmp_path_factory.mktemp("gemma3"), save_model=False)


def test_gemma3_three_images_and_markers(gemma3_dir, photo, photo2, wide):
    adapter = make_adapter(gemma3_dir)
    inputs = prepare_batch(
        adapter, [photo, photo2, wide], "<start_of_image> <start_of_image> what <start_of_image> ?", None, True
    )
    spans = inputs.layout.images[0]
    assert [s.image_index for s in spans] == [0, 1, 2]
    assert all(s.grid == (4, 4) for s in spans)
    assert int(inputs.layout.marker_mask.sum()) == 6
    # Text between images is neither prefix nor instruction.
    what = int(spans[1].positions[-1]) + 2
    assert not inputs.layout.prefix_mask[0, what] and not inputs.layout.instruction_mask[0, what]
    assert torch.equal(inputs.extras["token_type_ids"][0].bool(), inputs.layout.image_mask[0])


def test_gemma3_chat_template_false_takes_start_of_image(gemma3_dir, photo):
    adapter = make_adapter(gemma3_dir)
    inputs = prepare_batch(adapter, photo, "user : <start_of_image> what ? assistant :", None, False)
    assert inputs.layout.images[0][0].n_tokens == 16
    with pytest.raises(PromptError, match="<start_of_image>"):
        prepare_batch(adapter, photo, "user : what ? assistant :", None, False)


def test_gemma3_refuses_a_miscounted_prompt(gemma3_dir, photo):
    config = copy.deepcopy(load_config(str(gemma3_dir)))
    config.mm_tokens_per_image = 4
    adapter = Gemma3Adapter(config, load_processor(str(gemma3_dir)))
    with pytest.raises(PromptError, match="needs 4"):
        prepare_batch(adapter, photo, "what is in the image ?", None, True)


def test_gemma3_refuses_a_processor_that_disagrees_with_the_tower(gemma3_dir):
    processor = load_processor(str(gemma3_dir))
    processor.image_processor.size = {"height": 28, "width": 28}
    with pytest.raises(UnsupportedArchitectureError, match="28x28"):
        Gemma3Adapter(load_config(str(gemma3_dir)), processor)


def gemma3_config(**text_overrides):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    text.update(text_overrides)
    config = Gemma3Config(text_config=Gemma3TextConfig(**text).to_dict(),
                          vision_config=dict(model_type="siglip_vision_model", image_size=56, patch_size=7),
                          mm_tokens_per_image=16)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config


def test_gemma3_refusals():
    Gemma3Adapter.check_config(gemma3_config())
    text_only = Gemma3TextConfig(hidden_size=32, num_attention_heads=4, head_dim=8)
    text_only.architectures = ["Gemma3ForCausalLM"]
    with pytest.raises(UnsupportedArchitectureError, match="text-only"):
        Gemma3Adapter.check_config(text_only)
    with pytest.raises(UnsupportedArchitectureError, match="Gemma3ForCausalLM"):
        adapter_for(text_only)
    with pytest.raises(UnsupportedArchitectureError, match="attn_logit_softcapping"):
        Gemma3Adapter.check_config(gemma3_config(attn_logit_softcapping=50.0))
    odd = gemma3_config()
    odd.mm_tokens_per_image = 15
    with pytest.raises(UnsupportedArchitectureError, match="mm_tokens_per_image = 15"):
        Gemma3Adapter.check_config(odd)
