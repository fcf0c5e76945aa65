"""Small HTML helpers shared by the views and the report: escaping, embedded PNGs, pages.

Everything here returns strings; nothing reads the network or writes files. Embedded
resources are ``data:`` URIs or inline ``<script>`` text, so a page built from these
pieces makes no request when a browser opens it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

# A page never asks for anything outside itself: images are data: URIs, scripts inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

BASE_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; }
code, .mono { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: .92em; }
table.data { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
table.data td, table.data th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
table.data th { background: #f4f4f4; }
table.data td.l, table.data th.l { text-align: left; }
figure { margin: .8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #555; }
p.guide { font-size: .88em; color: #333; margin: .3em 0; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: .5em .8em; margin: .8em 0; }
.error { background: #fde8e8; border-left: 4px solid #c62828; padding: .5em .8em; margin: .8em 0; }
.tokens span.tok { display: inline-block; border: 1px solid #ddd; margin: 1px; padding: 0 3px; font-size: .85em;
                   font-family: ui-monospace, 'DejaVu Sans Mono', monospace; }
.tokens span.img { background: #e3efff; }
.tokens span.ans { background: #e6f6e6; }
nav.toc a { margin-right: 1em; }
"""


def esc(text: Any) -> str:
    """HTML-escape any value's ``str`` (quotes included)."""
    return html.escape(str(text), quote=True)


def script_json(value: Any) -> str:
    """JSON safe to place inside a ``<script>`` element.

    ``<``, ``>`` and ``&`` are written as ``\\u003c`` etc., so a token such as ``</s>``
    or ``<img 0,0>`` can neither close the script nor open a tag; NaN and infinities
    (not JSON) become null.
    """
    text = json.dumps(_plain(value), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if not math.isfinite(f) else f
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def inline_script(js: str) -> str:
    """A classic inline ``<script>`` holding ``js`` (``</script`` inside it neutralised)."""
    return "<script>\n" + js.replace("</script", "<\\/script") + "\n</script>"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """Encode a matplotlib figure as PNG bytes (the figure is left open for the caller)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def img_tag(png: bytes, alt: str, css_class: str = "figure") -> str:
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}" src="{png_data_uri(png)}">'


def figure_block(
    png: bytes,
    caption: str,
    alt: Optional[str] = None,
    fig_id: Optional[str] = None,
    *,
    guide: Optional[str] = None,
    notes: Sequence[str] = (),
    data: Optional[Mapping[str, str]] = None,
) -> str:
    """A ``<figure>``: the PNG, its caption, and optionally a reading guide and notes.

    Args:
        png: The figure's PNG bytes.
        caption: What the figure shows.
        alt: Alternative text (default: the caption).
        fig_id: Element id.
        guide: One line: what to look for, and what the study found (``p.guide``).
        notes: Caveats shown on the figure (``div.note.fig-note``): e.g. that every value
            is zero, or within numerical noise.
        data: Extra ``data-*`` attributes (e.g. ``{"table": "lens_match_rate"}``: the
            data file behind the figure, which tests and readers can open).
    """
    ident = f' id="{esc(fig_id)}"' if fig_id else ""
    attrs = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (data or {}).items())
    extra = "".join(f'<div class="note fig-note">{esc(n)}</div>' for n in notes)
    if guide:
        extra += f'<p class="guide">{esc(guide)}</p>'
    return f"<figure{ident}{attrs}>{img_tag(png, alt or caption)}<figcaption>{esc(caption)}</figcaption>{extra}</figure>"


def data_table(frame: Any, max_rows: int = 30, float_format: str = "{:.4g}") -> str:
    """A pandas DataFrame as a compact HTML table (the first ``max_rows`` rows)."""
    head = frame.head(max_rows)
    cols = list(head.columns)
    out = ['<table class="data"><thead><tr>']
    out += [f"<th>{esc(c)}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    for _, row in head.iterrows():
        out.append("<tr>")
        for c in cols:
            v = row[c]
            text = float_format.format(v) if isinstance(v, (float, np.floating)) else str(v)
            cls = "" if isinstance(v, (int, float, np.number)) else ' class="l"'
            out.append(f"<td{cls}>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if len(frame) > max_rows:
        out.append(f"<p class=\"note\">First {max_rows} of {len(frame)} rows; the full table is in the data files.</p>")
    return "".join(out)


def page(title: str, body: str, head_extra: str = "") -> str:
    """A complete, self-contained HTML document."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{BASE_CSS}</style>{head_extra}</head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


@dataclass(frozen=True, repr=False)
class HTMLView:
    """An HTML view: a fragment plus whatever inline scripts it needs, once.

    Attributes:
        fragment: The view's markup (and its render calls), without shared scripts.
        needs_circuitsvis: Whether ``fragment`` calls the CircuitsVis bundle, which a
            page must inline once before it.
        title: Title for a standalone page.
    """

    fragment: str
    needs_circuitsvis: bool = False
    title: str = "vlens view"

    def head(self) -> str:
        """What a page holding this view must load first (the bundle, inline)."""
        if not self.needs_circuitsvis:
            return ""
        from vlens.viz._circuitsvis import bundle_script

        return bundle_script()

    def to_html(self) -> str:
        """A standalone page: the view with its scripts inline, no external request."""
        return page(self.title, self.fragment, head_extra=self.head())

    def save(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_html` to ``path`` and return it."""
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # Notebooks: never a CDN (as circuitsvis does when online); the bundle goes into the
        # notebook once per kernel, with the first view that needs it (see vlens.viz._circuitsvis).
        if not self.needs_circuitsvis:
            return self.fragment
        from vlens.viz._circuitsvis import NOTEBOOK_BUNDLE

        return NOTEBOOK_BUNDLE.head() + self.fragment

    def __repr__(self) -> str:
        kind = ", CircuitsVis" if self.needs_circuitsvis else ""
        return f"HTMLView({self.title!r}, {len(self.fragment) / 1000:.1f} kB of HTML{kind}; shown as HTML in a notebook, .save(path) for a page)"

    def __add__(self, other: "HTMLView") -> "HTMLView":
        """Both views in one (a page or notebook output holds the bundle once)."""
        return HTMLView(self.fragment + other.fragment, self.needs_circuitsvis or other.needs_circuitsvis, self.title)


class CircuitsVisLoader:
    """Displayed in a notebook, loads the CircuitsVis bundle into the page (and counts as this
    kernel's copy, so later views do not repeat it). Needed only after the output of the
    kernel's first view was cleared; see :func:`vlens.viz.load_circuitsvis`."""

    def _repr_html_(self) -> str:
        from vlens.viz._circuitsvis import NOTEBOOK_BUNDLE, bundle_script

        NOTEBOOK_BUNDLE.mark_loaded()
        return bundle_script() + '<p class="caption">CircuitsVis bundle loaded.</p>'

    def __repr__(self) -> str:
        return "CircuitsVisLoader(): display it in a notebook to load the CircuitsVis bundle"


def load_circuitsvis() -> CircuitsVisLoader:
    """An object that, displayed in a notebook, puts the CircuitsVis bundle into the page."""
    return CircuitsVisLoader()
