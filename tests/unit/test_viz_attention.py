"""CircuitsVis attention views: fixed ids, offline bundle, token labels, windows."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from vlens.errors import AnalysisInputError
from vlens.layout import assemble_layout, grid_span
from vlens.viz import attention_heads_view, attention_view, choose_window
from vlens.viz._circuitsvis import bundle_js, bundle_script, render_component
from vlens.viz._html import script_json

IMG = 9


def layout_of(prefix: int, rows: int, cols: int, instr: int, answer: int = 0):
    n_img = rows * cols
    ids = torch.tensor([[1] * prefix + [IMG] * n_img + [2] * instr + [3] * answer])
    span = grid_span(0, torch.arange(prefix, prefix + n_img), rows, cols)
    return assemble_layout(ids, torch.ones_like(ids), IMG, [[span]], [prefix + n_img + instr])


def tokens_of(layout) -> list[str]:
    return layout.token_labels(0, [f"t{i}" for i in range(layout.seq_len)])


def causal_patterns(n_layers: int, n_heads: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layers, 1, n_heads, n, n, generator=g)
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


class FakeCache:
    """What attention_view reads from a VLMCache: layout, model.cfg.n_layers, patterns."""

    def __init__(self, layout, patterns):
        self.layout = layout
        self.model = SimpleNamespace(cfg=SimpleNamespace(n_layers=patterns.shape[0]))
        self._store = {f"blocks.{l}.attn.hook_pattern": patterns[l] for l in range(patterns.shape[0])}

    def __contains__(self, key):
        return key in self._store

    def __getitem__(self, key):
        return self._store[key]


def props_of(fragment: str, element_id: str) -> dict:
    """The JSON props of the CircuitsVis render call into ``element_id``."""
    match = re.search(r"CircuitsVis\.render\(\"" + re.escape(element_id) + r"\", CircuitsVis\.(\w+), (\{.*?\})\);", fragment)
    assert match, f"no render call for {element_id}"
    return {"component": match.group(1), **json.loads(match.group(2))}


def test_render_component_snapshot():
    html = render_component("ColoredTokens", "view-1", {"tokens": ["a", "&lt;img 0,0&gt;"], "values": [0.5, 1.0], "maxValue": None})
    # The call waits for the bundle (it may come from an earlier notebook output) and says so if it never comes.
    assert html == (
        '<div id="view-1" class="circuitsvis" data-component="ColoredTokens"></div><script>\n'
        '(function go(n) { if (window.CircuitsVis) { '
        'CircuitsVis.render("view-1", CircuitsVis.ColoredTokens, '
        '{"tokens": ["a", "\\u0026lt;img 0,0\\u0026gt;"], "values": [0.5, 1.0]}); } '
        'else if (n > 0) { setTimeout(function () { go(n - 1); }, 50); } '
        'else { var el = document.getElementById("view-1"); if (el) el.textContent = "The CircuitsVis bundle is not '
        'loaded in this page. In a notebook, the first vlens view of a kernel carries it: run that cell again, or '
        'display vlens.viz.load_circuitsvis() above this view."; } })(200);\n</script>'
    )
    with pytest.raises(ValueError, match="element id"):
        render_component("ColoredTokens", "1 bad id", {})


def test_script_json_cannot_close_the_script():
    text = script_json({"tokens": ["</script>", "<img 0,0>", "a&b"], "x": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"tokens": ["</script>", "<img 0,0>", "a&b"], "x": None}


def test_bundle_is_the_shipped_one_and_makes_no_request():
    js = bundle_js()
    assert js.startswith('"use strict";var CircuitsVis=')
    assert "sourceMappingURL" not in js  # devtools would fetch the map
    assert "unpkg.com" not in js and "import " not in js[:200]
    script = bundle_script()
    assert script.startswith('<script data-vlens="circuitsvis-bundle">')
    assert script.count("</script") == 1  # the bundle's own "</script>" string is neutralised


def test_attention_heads_view_fixed_ids_and_tokens():
    layout = layout_of(prefix=2, rows=2, cols=2, instr=3)
    tokens = tokens_of(layout)
    n = len(tokens)
    pattern = causal_patterns(1, 2, n)[0, 0]
    view = attention_heads_view(pattern, tokens, element_id="attn-test", title="Layer 0")
    again = attention_heads_view(pattern, tokens, element_id="attn-test", title="Layer 0")
    assert view.fragment == again.fragment  # deterministic: no random ids
    assert view.needs_circuitsvis
    heads = props_of(view.fragment, "attn-test-heads")
    assert heads["component"] == "AttentionHeads"
    assert heads["tokens"] == tokens and heads["tokens"][2] == "<img 0,0>"  # canvas labels: plain text
    assert heads["attentionHeadNames"] == ["H0", "H1"]
    assert torch.allclose(torch.tensor(heads["attention"]), pattern, atol=6e-4)
    strip = props_of(view.fragment, "attn-test-tokens")
    assert strip["component"] == "ColoredTokens"
    assert strip["tokens"][2] == "&lt;img 0,0&gt;"  # innerHTML component: escaped, shown verbatim
    assert torch.allclose(torch.tensor(strip["values"]), pattern[:, -1].mean(0), atol=6e-4)
    page = view.to_html()
    assert page.count('data-vlens="circuitsvis-bundle"') == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_attention_heads_view_rejects_mismatches():
    pattern = torch.rand(2, 4, 4)
    with pytest.raises(AnalysisInputError, match="3 tokens"):
        attention_heads_view(pattern, ["a", "b", "c"])
    with pytest.raises(AnalysisInputError, match=r"q == k"):
        attention_heads_view(torch.rand(2, 3, 4), ["a", "b", "c"])


def test_attention_view_layers_heads_window():
    layout = layout_of(prefix=2, rows=3, cols=3, instr=4)
    tokens = tokens_of(layout)
    patterns = causal_patterns(3, 4, len(tokens))
    cache = FakeCache(layout, patterns)
    view = attention_view(cache, tokens, layers=[0, 2], heads=[1, 3], window="image+instruction", id_prefix="v")
    heads = props_of(view.fragment, "v-L2-heads")
    assert heads["attentionHeadNames"] == ["L2H1", "L2H3"]
    assert heads["tokens"] == tokens[2:]  # the prefix is outside the window
    window = torch.arange(2, len(tokens))
    expected = patterns[2, 0][[1, 3]][:, window][:, :, window]
    assert torch.allclose(torch.tensor(heads["attention"]), expected, atol=6e-4)
    assert "v-L0-heads" in view.fragment and "v-L1-heads" not in view.fragment
    default = attention_view(cache, tokens)  # middle layer, every head, every token
    assert props_of(default.fragment, "vlens-attn-L1-heads")["attentionHeadNames"] == [f"L1H{h}" for h in range(4)]
    with pytest.raises(AnalysisInputError, match="out of range"):
        attention_view(cache, tokens, layers=[3])
    with pytest.raises(AnalysisInputError, match="real tokens"):
        attention_view(cache, tokens[:-1])
    with pytest.raises(AnalysisInputError, match="unknown attention window"):
        attention_view(cache, tokens, window="pictures")


def test_auto_window_keeps_text_and_most_attended_image_tokens():
    layout = layout_of(prefix=2, rows=6, cols=6, instr=4)  # 42 tokens
    n = int(layout.lengths[0])
    patterns = causal_patterns(1, 2, n)[:, 0]
    assert choose_window(layout, 0, "auto", patterns, max_tokens=64).tolist() == list(range(n))
    # Make image token at position 2 + 7 (<img 1,1>) the one text attends to most.
    boosted = patterns.clone()
    boosted[..., 38:, 9] += 5.0
    window = choose_window(layout, 0, "auto", boosted, max_tokens=10)
    text = [0, 1, 38, 39, 40, 41]
    assert window.numel() == 10
    assert set(text) <= set(window.tolist()) and 9 in window.tolist()
    assert window.tolist() == sorted(window.tolist())
    assert choose_window(layout, 0, [5, 3, 3]).tolist() == [3, 5]
    assert choose_window(layout, 0, slice(0, 4)).tolist() == [0, 1, 2, 3]
    with pytest.raises(AnalysisInputError, match="outside"):
        choose_window(layout, 0, [0, 99])


def test_default_window_fits_the_render_budget():
    from vlens.viz.attention import DEFAULT_CELL_BUDGET

    layout = layout_of(prefix=5, rows=24, cols=24, instr=20)  # a LLaVA-1.5-sized prompt: 601 tokens
    tokens = tokens_of(layout)
    cache = FakeCache(layout, causal_patterns(2, 32, len(tokens)))
    heads = props_of(attention_view(cache, tokens, layers=[1]).fragment, "vlens-attn-L1-heads")
    n = len(heads["tokens"])
    assert 32 * n * n <= DEFAULT_CELL_BUDGET and n == int((DEFAULT_CELL_BUDGET / 32) ** 0.5)
    assert heads["tokens"][:5] == tokens[:5] and heads["tokens"][-20:] == tokens[-20:]  # all the text is kept
    two = props_of(attention_view(cache, tokens, layers=[0, 1]).fragment, "vlens-attn-L0-heads")
    assert len(two["tokens"]) < n
    wide = props_of(attention_view(cache, tokens, layers=[1], heads=[0], max_tokens=90).fragment, "vlens-attn-L1-heads")
    assert len(wide["tokens"]) == 90


class _FakeShell:
    """What IPython.get_ipython() returns inside a kernel: a shell whose kernel has a session id."""

    def __init__(self, session: str) -> None:
        self.kernel = type("Kernel", (), {"session": type("Session", (), {"session": session})()})()


def test_two_views_in_one_kernel_hold_the_bundle_once(monkeypatch):
    import sys
    import types

    from vlens.viz import _circuitsvis, load_circuitsvis

    layout = layout_of(prefix=2, rows=2, cols=2, instr=3)
    tokens = tokens_of(layout)
    pattern = causal_patterns(1, 2, len(tokens))[0, 0]
    first = attention_heads_view(pattern, tokens, element_id="first")
    second = attention_heads_view(pattern, tokens, element_id="second")
    shell = {"now": _FakeShell("kernel-a")}
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell["now"]))
    monkeypatch.setattr(_circuitsvis, "NOTEBOOK_BUNDLE", _circuitsvis._NotebookBundle())
    marker = 'data-vlens="circuitsvis-bundle"'
    outputs = [first._repr_html_(), second._repr_html_(), first._repr_html_()]
    assert [o.count(marker) for o in outputs] == [1, 0, 0]
    assert all("CircuitsVis.render(" in o for o in outputs)
    assert len(outputs[1]) < 100_000 < len(outputs[0])  # the later output holds only its own markup
    # A new kernel (a restart) gets the bundle again, with its first view.
    shell["now"] = _FakeShell("kernel-b")
    assert second._repr_html_().count(marker) == 1
    # The loader counts as the kernel's copy.
    shell["now"] = _FakeShell("kernel-c")
    assert load_circuitsvis()._repr_html_().count(marker) == 1 and marker not in first._repr_html_()
    # Colab puts each output in its own iframe: there every view carries the bundle.
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert second._repr_html_().count(marker) == 1
    monkeypatch.delitem(sys.modules, "google.colab")
    # Outside a kernel every output is standalone; a page of both views holds the bundle once.
    shell["now"] = None
    assert first._repr_html_().count(marker) == 1
    assert (first + second).to_html().count(marker) == 1
