"""Facts about a written report, checked on its HTML and data files (no browser needed).

Shared by ``test_report_facts.py`` (runs everywhere) and ``test_report_browser.py`` (the same
facts on the page Chromium rendered). Each check reads the page and the data files the report
wrote; none calls the code that built them.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import torch

# Columns that locate a value (which layer, head, token) rather than being one.
COORDINATES = {"batch", "layer", "head", "pos", "rank", "token_id", "count", "grid_row", "grid_col", "block", "img"}
FIGURE = re.compile(r"<figure(?P<attrs>[^>]*)>(?P<body>.*?)</figure>", re.S)


def meta_value(page: str, key: str) -> str:
    """The header table's value for ``key``."""
    found = re.search(rf'<th class="l">{re.escape(html.escape(key, quote=True))}</th><td class="l">(.*?)</td>', page)
    assert found, f"the report header has no {key!r} row"
    return html.unescape(found.group(1))


def figures(page: str) -> dict[str, dict]:
    """Every ``<figure>`` by id: its data-* attributes, PNG, caption, notes and guide."""
    out = {}
    for m in FIGURE.finditer(page):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group("attrs")))
        body = m.group("body")
        png = re.search(r'src="data:image/png;base64,([^"]+)"', body)
        caption = re.search(r"<figcaption>(.*?)</figcaption>", body, re.S)
        out[attrs.get("id", f"figure-{len(out)}")] = {
            "attrs": attrs,
            "png": base64.b64decode(png.group(1)) if png else None,
            "caption": html.unescape(caption.group(1)) if caption else "",
            "notes": [html.unescape(n) for n in re.findall(r'<div class="note fig-note">(.*?)</div>', body, re.S)],
            "guide": [html.unescape(g) for g in re.findall(r'<p class="guide">(.*?)</p>', body, re.S)],
        }
    return out


def value_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in COORDINATES and pd.api.types.is_numeric_dtype(frame[c])]


def is_empty(frame: pd.DataFrame) -> bool:
    """No finite value, or every value the same: a figure of it shows nothing."""
    values = frame[value_columns(frame)].to_numpy(dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    return finite.size == 0 or bool(np.all(finite == finite[0]))


def assert_no_figure_empty_without_a_note(page: str, data_dir: Path) -> None:
    """Every figure decodes to a picture that is not blank, has a caption and a reading guide;
    one whose data file holds nothing to see (no finite value, or all equal) carries a note."""
    found = figures(page)
    assert found, "the report has no figure"
    for fig_id, fig in found.items():
        assert fig["png"], f"{fig_id} has no image"
        image = np.asarray(PIL.Image.open(io.BytesIO(fig["png"])).convert("RGB"))
        assert image.shape[0] > 10 and image.shape[1] > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 2, (
            f"{fig_id} is blank"
        )
        assert fig["caption"].strip(), f"{fig_id} has no caption"
        assert len(fig["guide"]) == 1 and fig["guide"][0].startswith("Look for:"), f"{fig_id} has no reading guide"
        table = fig["attrs"].get("data-table")
        if table is None:
            continue
        frame = pd.read_csv(data_dir / f"{table}.csv")
        if is_empty(frame):
            assert fig["notes"], f"{fig_id} shows {table}.csv, which holds nothing to see, and has no note saying so"


def assert_shared_colour_scale(page: str) -> None:
    """The per-block attention maps (and every other small-multiples map) use one colour scale:
    the caption says so, and the picture has a colour bar, a tall strip of many colours at the
    right edge (a grid of panels each scaled by itself has none)."""
    maps = {k: v for k, v in figures(page).items() if k in ("fig-attention-received", "fig-similarity-map")}
    assert "fig-attention-received" in maps
    for fig_id, fig in maps.items():
        assert "one colour scale shared by every panel" in fig["caption"], fig_id
        image = np.asarray(PIL.Image.open(io.BytesIO(fig["png"])).convert("RGB")).astype(int)
        h, w, _ = image.shape
        strip = image[int(0.2 * h): int(0.8 * h), int(0.9 * w): int(0.94 * w)]
        distinct = max(len(np.unique(strip[:, x], axis=0)) for x in range(strip.shape[1]))
        assert distinct >= 40, f"{fig_id}: no colour bar at the right edge ({distinct} colours in the strip)"


def greedy_answer(model_dir: Path, image: PIL.Image.Image, prompt: str, n: int = 20) -> str:
    """The untouched Hugging Face model's greedy answer (a no-cache loop over whole sequences)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tests.parity.helpers import greedy_without_cache
    from vlens import HookedVLM

    processor = AutoProcessor.from_pretrained(model_dir)
    reference = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    kwargs = HookedVLM.from_pretrained(model_dir, device="cpu").prepare(image, prompt).model_kwargs()
    tokens = greedy_without_cache(reference, kwargs, n).tolist()
    eos = processor.tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
