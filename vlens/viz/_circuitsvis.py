"""Rendering CircuitsVis components offline, with fixed element ids.

CircuitsVis's own ``render`` helper is not used: ``RenderedHTML._repr_html_`` pings
``http://google.com`` to decide between its inline bundle and a CDN ``import`` from
unpkg, and ``str()`` of a rendered view *is* the CDN version; element ids are random
UUIDs. vlens instead reads the browser bundle the pip package ships
(``circuitsvis/dist/cdn/iife.js``), inlines it once per page as a classic script (its
``//# sourceMappingURL`` comment removed, so devtools do not ask for the map), and
renders each component into a div whose id the caller chooses.

The bundle is about 1.9 MB, so it is put into a page once: a standalone page or the report
inlines it in its head; in a notebook, the first view displayed in a kernel carries it and
later views of that kernel reuse it (their output holds only their own markup). Each render
call waits for the bundle to be defined (later outputs may render before the first one has
run its script) and, if it never is, says in the view how to load it.

Token strings reach CircuitsVis in two ways. Its attention charts draw labels on a
canvas, so they get the plain text. Its token components (``ColoredTokens`` and the
others built on its ``Token``) insert a token with ``innerHTML`` after only replacing
whitespace, so ``<img 3,4>`` would be parsed as a tag and vanish (and any token could
inject markup); those get HTML-escaped text, which the browser shows verbatim.
"""

from __future__ import annotations

import html
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from vlens.viz._html import esc, inline_script, script_json

# CircuitsVis components that put token text into the page with innerHTML.
HTML_TOKEN_COMPONENTS = frozenset({"ColoredTokens", "ColoredTokensMulti", "TextNeuronActivations", "TokenLogProbs", "AttentionPatterns"})
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


class BundleNotFoundError(FileNotFoundError):
    """The installed circuitsvis package does not ship its browser bundle."""


def bundle_path() -> Path:
    """Where the installed circuitsvis keeps its browser (IIFE) bundle."""
    path = Path(str(resources.files("circuitsvis"))) / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise BundleNotFoundError(
            f"circuitsvis is installed without its browser bundle ({path} is missing); "
            "reinstall it from a wheel that includes dist/cdn/iife.js"
        )
    return path


def bundle_js() -> str:
    """The CircuitsVis bundle, ready to inline (defines the global ``CircuitsVis``)."""
    js = bundle_path().read_text(encoding="utf-8")
    return re.sub(r"//# sourceMappingURL=\S*\s*$", "", js.rstrip()) + "\n"


def bundle_script() -> str:
    """The bundle as one inline ``<script>`` element, marked for tests and readers."""
    return inline_script(bundle_js()).replace("<script>", '<script data-vlens="circuitsvis-bundle">', 1)


def token_text(tokens: Sequence[str], component: str) -> list[str]:
    """Token strings as a component should receive them (escaped where it uses innerHTML)."""
    if component in HTML_TOKEN_COMPONENTS:
        return [html.escape(str(t), quote=False) for t in tokens]
    return [str(t) for t in tokens]


# How long a render call waits for the bundle (a page may still be running the bundle's script).
_WAIT_TRIES, _WAIT_MS = 200, 50
_MISSING = (
    "The CircuitsVis bundle is not loaded in this page. In a notebook, the first vlens view of a kernel "
    "carries it: run that cell again, or display vlens.viz.load_circuitsvis() above this view."
)


def _kernel_key() -> Optional[str]:
    """An id of the IPython kernel (or shell) this process runs, None outside IPython.

    IPython is never imported here: a process that has not imported it is not a notebook.
    """
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    shell = ipython.get_ipython()
    if shell is None:
        return None
    kernel = getattr(shell, "kernel", None)
    session = getattr(getattr(kernel, "session", None), "session", None)
    return str(session) if session else f"shell-{id(shell)}"


class _NotebookBundle:
    """Which notebook kernels have already displayed the bundle (one per process)."""

    def __init__(self) -> None:
        self._kernels: set[str] = set()

    def head(self) -> str:
        """The bundle for the first view a kernel displays, nothing for the later ones; the
        bundle every time outside IPython (the HTML is then likely to go into a page alone)."""
        key = _kernel_key()
        # Colab renders every output in its own iframe: a later output cannot see the first one's bundle.
        if key is None or "google.colab" in sys.modules:
            return bundle_script()
        if key in self._kernels:
            return ""
        self._kernels.add(key)
        return bundle_script()

    def mark_loaded(self) -> None:
        key = _kernel_key()
        if key is not None:
            self._kernels.add(key)


NOTEBOOK_BUNDLE = _NotebookBundle()


def render_component(component: str, element_id: str, props: dict[str, Any]) -> str:
    """Markup that renders one CircuitsVis component into ``<div id=element_id>``.

    The page must inline :func:`bundle_script` before this markup. ``props`` is
    converted to JSON (tensors and arrays become lists; ``None`` values are dropped, as
    CircuitsVis does). Pass token lists through :func:`token_text` first.
    """
    if not _ID.match(element_id):
        raise ValueError(f"element id {element_id!r} must start with a letter and hold only letters, digits, - and _")
    clean = {k: v for k, v in props.items() if v is not None}
    ident = script_json(element_id)
    call = f"CircuitsVis.render({ident}, CircuitsVis.{component}, {script_json(clean)});"
    # Wait for the bundle (an earlier output, or the page head), then draw; say so if it never comes.
    call = (
        f"(function go(n) {{ if (window.CircuitsVis) {{ {call} }} else if (n > 0) {{ setTimeout(function () {{ go(n - 1); }}, "
        f"{_WAIT_MS}); }} else {{ var el = document.getElementById({ident}); if (el) el.textContent = "
        f"{script_json(_MISSING)}; }} }})({_WAIT_TRIES});"
    )
    return (
        f'<div id="{esc(element_id)}" class="circuitsvis" data-component="{esc(component)}"></div>'
        + inline_script(call)
    )
