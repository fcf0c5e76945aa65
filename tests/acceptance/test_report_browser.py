"""The report in a real browser: Debian's headless Chromium, driven by Playwright.

The generated ``report.html`` (and a standalone attention view) is opened from disk in a
fresh profile with the network switched off. The test asserts that no request left the
page, the console stayed free of errors, every figure decoded, and the CircuitsVis
components rendered (their canvases drawn, their tokens shown as ``<img r,c>``); and, on
the page as the browser built it, the facts ``report_facts`` checks on the HTML: the
header's greedy answer is the model's own, the per-block maps share one colour scale with a
colour bar, and no figure is empty without a visible note.

Playwright is pointed at ``/usr/bin/chromium`` (installed by ``.ci/run``); it never
downloads a browser of its own.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def model_dir():
    """The toy model when it is shipped, else None (a tiny random LLaVA is built instead)."""
    from vlens.zoo import toy_checkpoint_path

    try:
        return toy_checkpoint_path()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, model_dir):
    """A report on the toy model when it is shipped, else on a tiny random LLaVA."""
    from click.testing import CliRunner

    from vlens.cli import main

    out = tmp_path_factory.mktemp("report")
    if model_dir is not None:
        model = str(model_dir)
    else:
        from tests.tiny.llava import build_llava

        model = str(build_llava(tmp_path_factory.mktemp("llava64"), image_size=64, patch=8))
    runner = CliRunner()
    result = runner.invoke(main, ["report", "--model", model, "--out", str(out / "report")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr
    view = runner.invoke(main, ["attention", "--model", model, "--layers", "0", "--html", str(out / "attention.html")],
                         catch_exceptions=False)
    assert view.exit_code == 0, view.output
    return out


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=FLAGS, offline=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def open_offline(context, path: Path):
    """Open a file with every non-file request blocked and recorded; returns the page and logs."""
    page = context.new_page()
    log = {"requests": [], "blocked": [], "errors": []}
    page.on("request", lambda request: log["requests"].append(request.url))
    page.on("console", lambda msg: log["errors"].append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda err: log["errors"].append(f"page error: {err}"))

    def guard(route):
        if route.request.url.startswith("file://") or route.request.url.startswith("data:"):
            route.continue_()
        else:
            log["blocked"].append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, log


def strip_tokens(page_html: str, element_id: str) -> list[str]:
    """The tokens a CircuitsVis render call passes to ``element_id``."""
    call = re.search(r'CircuitsVis\.render\("' + re.escape(element_id) + r'", CircuitsVis\.\w+, (\{.*?\})\);', page_html)
    assert call, f"no render call for {element_id}"
    return json.loads(call.group(1))["tokens"]


CV_RENDERED = """ids => ids.every(id => {
    const heads = document.getElementById(id + '-heads');
    const tokens = document.getElementById(id + '-tokens');
    return heads && tokens && heads.querySelectorAll('canvas').length > 1
        && tokens.querySelectorAll('.colored-tokens span').length > 0;
})"""


def test_report_renders_offline(report_dir, browser_context):
    path = report_dir / "report" / "report.html"
    page, log = open_offline(browser_context, path)
    ids = page.eval_on_selector_all(".vlens-attention", "els => els.map(e => e.id)")
    assert ids, "the report has no CircuitsVis attention view"
    page.wait_for_function(CV_RENDERED, arg=ids, timeout=60_000)
    page.wait_for_timeout(500)  # let late errors surface

    assert log["requests"] == [path.resolve().as_uri()], log["requests"]  # nothing but the page itself
    assert log["blocked"] == []
    assert log["errors"] == []

    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight])")
    assert len(images) >= 7
    for alt, complete, width, height in images:
        assert complete and width > 0 and height > 0, f"figure {alt!r} did not decode"

    # The token strip shows exactly the window's tokens, image tokens by their grid labels.
    strip = page.inner_text(f"#{ids[0]}-tokens").replace("\xa0", " ")
    expected = "".join(html.unescape(t) for t in strip_tokens(path.read_text(encoding="utf-8"), f"{ids[0]}-tokens"))
    assert strip == expected.replace("\n", " ")
    assert len(re.findall(r"<img \d+,\d+>", strip)) >= 8
    assert page.locator(".note.skipped").count() == 0
    for section in ("input", "lens", "similarity", "attention", "patterns", "count", "contributions", "pruning",
                    "contextual_lens"):
        assert page.locator(f"section#{section} > h2").count() == 1
    page.screenshot(path=str(report_dir / "report.png"), full_page=True)
    page.close()


def test_rendered_report_shows_the_answer_one_colour_scale_and_no_bare_empty_figure(report_dir, model_dir, browser_context):
    from tests.acceptance import report_facts as facts

    if model_dir is None:
        pytest.skip("the toy model is not shipped: its greedy answer and scene are what this test checks")
    from vlens.data import CAPTION_QUESTION, generate_scene

    path = report_dir / "report" / "report.html"
    page, log = open_offline(browser_context, path)
    rendered = page.content()  # the DOM as Chromium built it
    reference = facts.greedy_answer(model_dir, generate_scene(0).image, CAPTION_QUESTION)
    shown = page.inner_text("#meta").splitlines()
    assert f"model's greedy answer\t{reference}" in shown, shown
    facts.assert_shared_colour_scale(rendered)
    facts.assert_no_figure_empty_without_a_note(rendered, report_dir / "report" / "data")
    # Each note is on screen, not merely in the markup.
    for box in page.eval_on_selector_all(".fig-note", "els => els.map(e => e.getBoundingClientRect().height)"):
        assert box > 0
    assert log["blocked"] == [] and log["errors"] == []
    page.close()


def test_standalone_attention_view_renders_offline(report_dir, browser_context):
    path = report_dir / "attention.html"
    page, log = open_offline(browser_context, path)
    page.wait_for_function(CV_RENDERED, arg=["vlens-attn-L0"], timeout=60_000)
    page.wait_for_timeout(300)
    assert log["requests"] == [path.resolve().as_uri()]
    assert log["blocked"] == [] and log["errors"] == []
    # The zoomed head shows the first head of layer 0.
    assert "L0H0 Zoomed" in page.inner_text("#vlens-attn-L0-heads")
    page.close()
