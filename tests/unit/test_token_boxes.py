"""Each visual token's pixel box on the input image (``adapter.token_boxes``, ``ImageSpan.boxes``)
and the scene geometry of each family, against hand computations and the processors' own pixels.

No weights are needed except LLaVA's and BLIP's builders, which always write their tiny model.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import make_photo
from tests.tiny.blip import build_blip2
from tests.tiny.gemma3 import build_gemma3
from tests.tiny.idefics3 import build_idefics3
from tests.tiny.llava import build_llava
from tests.tiny.llava_next import build_llava_next
from tests.tiny.qwen2_vl import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_vl
from vlens.adapters import adapter_for
from vlens.adapters._geometry import grid_boxes
from vlens.data import make_scenes
from vlens.loading import load_config, load_processor
from vlens.prepare import prepare_batch
from vlens.viz import model_view_image

PROMPT = "what is in the image ?"
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
BUILDERS = {
    "llava": lambda path: build_llava(path),
    "llava_next": lambda path: build_llava_next(path, save_model=False),
    "gemma3": lambda path: build_gemma3(path, save_model=False),
    "idefics3": lambda path: build_idefics3(path, save_model=False),
    "blip2": lambda path: build_blip2(path),
    "qwen2_vl": lambda path: build_qwen2_vl(path, save_model=False),
    "qwen2_5_vl": lambda path: build_qwen2_5_vl(path, save_model=False),
    "qwen3_vl": lambda path: build_qwen3_vl(path, save_model=False),
}


def build_adapter(family, tmp_path_factory):
    path = BUILDERS[family](tmp_path_factory.mktemp(family))
    config = load_config(str(path))
    cls = adapter_for(config)
    return cls(config, load_processor(str(path), cls.video_processor_class))


@pytest.fixture(scope="module", params=list(BUILDERS))
def adapter(request, tmp_path_factory):
    return build_adapter(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=[f for f in BUILDERS if f != "blip2"])  # query tokens have no boxes
def grid_adapter(request, tmp_path_factory):
    return build_adapter(request.param, tmp_path_factory)


def span_of(adapter, image):
    return prepare_batch(adapter, image, PROMPT, None, True).layout.images[0][0]


def coordinate_image(width: int, height: int) -> PIL.Image.Image:
    """Red encodes x and green y (pixel centres, scaled to 0..255): a patch's mean colour tells
    where on the image it came from."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    return PIL.Image.fromarray(np.round(rgb).astype(np.uint8))


def test_llava_centre_crop_boxes_by_hand(tmp_path):
    """A 61 x 43 image: the short side 43 -> 28 px, the long side int(28 * 61 / 43) = 39 px,
    then the central 28 px (left (39 - 28) // 2 = 5); a 7 px patch (r, c) is pixels
    [7c + 5, 7c + 12) x [7r, 7r + 7) of the resized image, i.e. x * 61 / 39, y * 43 / 28."""
    config = load_config(str(build_llava(tmp_path / "llava")))
    adapter = adapter_for(config)(config, load_processor(str(tmp_path / "llava")))
    span = span_of(adapter, make_photo(61, 43))
    r, c = span.row_col[:, 0].double(), span.row_col[:, 1].double()
    sx, sy = 61 / 39, 43 / 28
    expected = torch.stack([(7 * c + 5) * sx, 7 * r * sy, (7 * c + 12) * sx, (7 * r + 7) * sy], dim=1)
    assert torch.allclose(span.boxes.double(), expected, atol=1e-4)
    assert torch.allclose(adapter.token_boxes(span, (61, 43)), span.boxes)
    # Portrait: the width 40 -> 28, the height int(28 * 52 / 40) = 36, top (36 - 28) // 2 = 4.
    tall = span_of(adapter, make_photo(40, 52))
    r, c = tall.row_col[:, 0].double(), tall.row_col[:, 1].double()
    sx, sy = 40 / 28, 52 / 36
    expected = torch.stack([7 * c * sx, (7 * r + 4) * sy, (7 * c + 7) * sx, (7 * r + 11) * sy], dim=1)
    assert torch.allclose(tall.boxes.double(), expected, atol=1e-4)
    # The model's view is the input image cut to the central square the grid covers.
    inputs = prepare_batch(adapter, make_photo(61, 43), PROMPT, None, True)
    assert model_view_image(inputs, adapter.processor).size == (round(33 * 61 / 39) - round(5 * 61 / 39), 43)


@pytest.mark.parametrize("size", [(61, 43), (40, 52), (90, 30), (200, 120)])
def test_boxes_agree_with_the_processors_own_pixels(grid_adapter, size):
    """Each token's patch of the processed pixels has the mean colour of its box's centre on a
    coordinate image, within 2% of a cell (tiles: tokens whose patch touches padding skipped)."""
    adapter = grid_adapter
    width, height = size
    inputs = prepare_batch(adapter, coordinate_image(width, height), PROMPT, None, True)
    span = inputs.layout.images[0][0]
    ip = adapter.processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    pixels = (inputs.pixel_values[0].float() * std + mean) / ip.rescale_factor if inputs.pixel_values.ndim > 2 else None
    vision = adapter.config.vision_config
    checked = 0
    for k in range(span.n_tokens):
        box = span.boxes[k]
        if not bool(torch.isfinite(box).all()):
            continue
        tile = int(span.tile[k])
        r, c = span.row_col[k].tolist()
        if adapter.family in ("llava", "gemma3"):
            sub = pixels
            cell = vision.patch_size if adapter.family == "llava" else adapter.cell_side
        elif adapter.family == "llava_next":
            sub, cell = pixels[tile], vision.patch_size  # sub-image 0 is the base image, then the crops
            g = vision.image_size // vision.patch_size
            if tile > 0:
                canvas = adapter.canvas(torch.tensor([height, width]))
                r, c = (v % g for v in canvas.canvas_rc[k])
        elif adapter.family in QWEN:
            # Flat patches, merge x merge of them per token in raster order of the tokens, each
            # (channel, frame, y, x): the token's pixels are its patches' pixels.
            m, p = adapter.merge, vision.patch_size
            flat = inputs.pixel_values[k * m * m : (k + 1) * m * m].float().view(m * m, 3, -1, p, p)
            patch = (flat * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)) / ip.rescale_factor
            patch = patch.permute(1, 0, 2, 3, 4).reshape(3, -1, p)
            assert span.grid == tuple(int(v) // m for v in inputs.extras["image_grid_thw"][0, 1:])
        else:  # idefics3: the crops in order, then the global image (tile 0)
            n_sub = len(span.tile_grids)
            sub, cell = pixels[n_sub - 1 if tile == 0 else tile - 1], vision.patch_size * adapter.config.scale_factor
        if adapter.family not in QWEN:
            patch = sub[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
        if bool((patch.abs() < 0.5).all(0).any()):  # padding of a tile canvas
            continue
        seen_x, seen_y = float(patch[0].mean()) * width / 255, float(patch[1].mean()) * height / 255
        centre_x, centre_y = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        assert abs(seen_x - centre_x) <= 0.02 * float(box[2] - box[0]), (k, seen_x, box.tolist())
        assert abs(seen_y - centre_y) <= 0.02 * float(box[3] - box[1]), (k, seen_y, box.tolist())
        checked += 1
    assert checked >= span.on_grid.sum()  # at least every whole-image token was checked


def test_query_and_separator_tokens_have_no_box(adapter):
    span = span_of(adapter, make_photo(61, 43))
    finite = torch.isfinite(span.boxes).all(1)
    if adapter.family == "blip2":
        assert not bool(finite.any())  # query tokens mix every patch they attend to
    else:
        assert torch.equal(finite, span.row_col[:, 0] >= 0)  # e.g. LLaVA-NeXT's newline tokens
        inside = span.boxes[finite]
        assert bool((inside[:, :2] >= 0).all() and (inside[:, 2] <= 61).all() and (inside[:, 3] <= 43).all())


def test_scene_cells_are_the_token_cells(adapter):
    """A scene drawn at the family's geometry gives the whole-image grid exactly the scene's
    label cells: tile-0 token (r, c) covers cell (r, c) of ``patch_labels``."""
    geometry = adapter.scene_geometry()
    scene = make_scenes(1, seed=3, split="heldout", **geometry.scene_kwargs())[0]
    span = span_of(adapter, scene.image)
    assert span.grid == geometry.token_grid
    if geometry.token_grid is None:
        rows = cols = geometry.image_size // geometry.patch_size
        assert scene.patch_labels.shape == (rows, cols)
        assert span.query_attention is None or span.query_attention.shape[1:] == (rows, cols)
        return
    assert scene.patch_labels.shape == geometry.token_grid
    rows, cols = geometry.token_grid
    on = span.on_grid
    order = (span.row_col[on, 0] * cols + span.row_col[on, 1]).argsort()
    expected = grid_boxes(rows, cols, geometry.patch_size)
    assert torch.allclose(span.boxes[on][order], expected, atol=1e-3)


def test_scene_geometry_by_hand(adapter):
    """The tiny configs: LLaVA and LLaVA-NeXT 28 px with 7 px patches (4 x 4); Gemma3's 8 x 8
    patches pooled to 4 x 4 (14 px cells); Idefics3's 56 px crops, 7 px patches shuffled 2 x 2
    (14 px cells); BLIP-2's 28 px tower with 7 px patches and no token grid."""
    expected = {
        "llava": (28, 7, (4, 4)),
        "llava_next": (28, 7, (4, 4)),
        "gemma3": (56, 14, (4, 4)),
        "idefics3": (56, 14, (4, 4)),
        "blip2": (28, 7, None),
        # 4 px patches merged 2 x 2 (8 px cells); at most 64 x 64 px unresized: 8 x 8 tokens.
        "qwen2_vl": (64, 8, (8, 8)),
        "qwen2_5_vl": (64, 8, (8, 8)),
        "qwen3_vl": (64, 8, (8, 8)),
    }[adapter.family]
    g = adapter.scene_geometry()
    assert (g.image_size, g.patch_size, g.token_grid) == expected


def test_model_view_is_the_region_the_whole_image_grid_covers(adapter):
    """Resizing and tiled families see the whole image on their base or global grid; query
    tokens (no boxes) keep the processed pixels, on whose patch grid their attention lies."""
    photo = make_photo(61, 43)
    inputs = prepare_batch(adapter, photo, PROMPT, None, True)
    view = model_view_image(inputs, adapter.processor)
    if adapter.family == "blip2":
        assert view.size == tuple(inputs.pixel_values.shape[-1:-3:-1])
    elif adapter.family == "llava":
        assert view.size == (44, 43)  # the central square, as in test_llava_centre_crop_boxes_by_hand
    else:
        assert view is photo
