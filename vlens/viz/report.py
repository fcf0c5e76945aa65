"""The HTML report: every analysis on one image and prompt, in one self-contained file.

:func:`build_report` runs the model once with the streams of ``vlens.analysis`` attached
(the logit lens, modality similarity and attention to the image reduce each layer inside its
hook, so no layer's activations are kept) and a cache of only the attention patterns the
CircuitsVis view shows; then the token-removal analyses, and turns results into sections:
figures as base64 PNGs, CircuitsVis attention views with the bundle inlined once, and the
tables behind every figure. :meth:`Report.write` saves ``report.html`` and one CSV (or
Parquet) file per table.

An analysis that fails on this model becomes a visible note in its section (never a silent
gap), and is listed in ``Report.problems``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import pandas as pd
import PIL.Image
import torch

from vlens import analysis as va
from vlens.analysis.lens import label_ids
from vlens.viz._guide import FIGURE_GUIDE
from vlens.viz._html import data_table, esc, figure_block, figure_png
from vlens.viz._report_notes import (
    contribution_notes,
    lens_labels_for,
    match_rate_curves,
    match_rate_notes,
)
from vlens.viz._report_page import Report, Section, _Context, _guarded, _result
from vlens.viz.attention import attention_view
from vlens.viz.curves import attention_mass_figure, bar_figure, count_curve_figure, layer_curve, similarity_figure
from vlens.viz.heatmap import heatmap_grid, image_heatmap, model_view_image
from vlens.viz.lens_panel import decoder, layer_labels, lens_grid, lens_panel, pick_layers
from vlens.viz.report_causal import causal_steps
from vlens.viz.report_pruning import SECTIONS as PRUNING_SECTIONS

if TYPE_CHECKING:
    from vlens.data import Scene
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    return None


def build_report(
    model: "HookedVLM",
    inputs: "VLMInputs",
    *,
    title: Optional[str] = None,
    lens_labels: Optional[list] = None,
    attention_layers: Optional[Sequence[int]] = None,
    meta: Optional[dict[str, Any]] = None,
    progress: Optional[Progress] = None,
    scene: Optional["Scene"] = None,
) -> Report:
    """Run every analysis on a one-example batch and build the report.

    Args:
        model: A ``HookedVLM``.
        inputs: ``model.prepare(image, prompt, answer=...)`` for one example with an
            answer (the loss-based analyses score the answer).
        title: Page title.
        lens_labels: Expected word per image token, for the lens's match rate (None: no
            label). Default: from ``scene`` when it is given.
        attention_layers: Layers of the CircuitsVis view (default: all when the model
            has at most 4, else first, middle and last).
        meta: Extra facts for the header (model name, prompt source, ...).
        progress: Called with a message before each long step (the CLI prints them).
        scene: The generated scene the image is (``vlens.data.generate_scene``): its per-patch
            ground truth labels the lens's image tokens with their object's colour word
            (and the shape word, a second curve) unless ``lens_labels`` is given. The report
            says which labels it used.
    """
    say = progress or _silent
    if inputs.batch_size != 1:
        from vlens.errors import AnalysisInputError

        raise AnalysisInputError(f"the report covers one example; got a batch of {inputs.batch_size}")
    pattern_layers = pattern_layers_for(model, attention_layers)
    labels = lens_labels_for(model.tokenizer, inputs.layout.images[0][0], lens_labels, scene)
    lens_labels = None if labels is None else labels.words
    say("forward pass with the streams attached (lens, similarity, attention) and the viewed patterns cached")
    results, cache = activation_analyses(model, inputs, lens_labels, pattern_layers)
    span = inputs.layout.images[0][0]
    ctx = _Context(
        model=model,
        inputs=inputs,
        cache=cache,
        tokens=model.to_str_tokens(inputs),
        span=span,
        image=model_view_image(inputs, model.processor),
        pattern_layers=pattern_layers,
        results=results,
        labels=labels,
    )
    sections = [_input_section(ctx)]
    steps: list[tuple[str, Callable[[_Context], Section]]] = [
        ("logit lens", _lens_section),
        ("modality similarity", _similarity_section),
        ("attention to the image", _attention_section),
        ("attention patterns (CircuitsVis)", _patterns_section),
        ("loss vs visual-token count", _count_section),
        ("visual-token contributions", _contribution_section),
    ]
    steps += causal_steps()
    steps += list(PRUNING_SECTIONS)
    for i, (name, build) in enumerate(steps, 1):
        say(f"[{i}/{len(steps)}] {name}")
        started = time.perf_counter()
        sections.append(build(ctx))
        say(f"[{i}/{len(steps)}] {name}: done in {time.perf_counter() - started:.1f}s")
    facts = {
        "model": model.name,
        "family": model.adapter.family,
        "layers": model.n_layers,
        "prompt": inputs.prompts[0],
        "answer": inputs.answers[0],
        "image tokens": f"{span.n_tokens}" + (f" on a {span.grid[0]}x{span.grid[1]} grid" if span.grid else " (no grid)"),
        "lens labels": "none given" if labels is None else labels.source,
    }
    facts.update(meta or {})
    return Report(title=title or f"vlens report: {model.name}", sections=tuple(sections), meta=facts)


# ---- sections ------------------------------------------------------------------------


def activation_analyses(
    model: "HookedVLM", inputs: "VLMInputs", lens_labels: Optional[list], pattern_layers: Sequence[int]
) -> tuple[dict[str, Any], Any]:
    """The report's one forward pass: the lens, similarity and attention streams attached
    (each reduces every layer in its hook), and a CPU cache of only the attention patterns of
    ``pattern_layers``, which the CircuitsVis view draws (kept in float16).

    Returns:
        ``(results, cache)``: stream name -> its per-example result (or the error it raised).
    """
    streams, hooks, results = _report_streams(model, inputs, lens_labels)
    names = [f"blocks.{l}.attn.hook_pattern" for l in pattern_layers]
    with torch.no_grad(), model.hooks(hooks):
        # The view only draws these patterns (as colours): half precision halves what is kept.
        _, cache = model.run_with_cache(inputs, names_filter=names, device="cpu", dtype=torch.float16)
    for key, stream in streams.items():
        try:
            stream.commit()
            results[key] = stream.last_batch
        except Exception as err:  # one failing reduction must not lose the others
            results[key] = err
    return results, cache


def _report_streams(model: "HookedVLM", inputs: "VLMInputs", lens_labels: Optional[list]) -> tuple[dict[str, Any], list, dict[str, Any]]:
    """The streams of the report's activation analyses and their hooks for ``inputs``; one
    that cannot start (a bad position, say) is an error result instead."""
    tok = model.tokenizer

    def labels(_inputs: "VLMInputs", row: int) -> torch.Tensor:
        # Ground-truth words: one the vocabulary lacks is no label (lens.label_id).
        assert lens_labels is not None  # the lens stream gets this function only when there are labels
        return label_ids(tok, lens_labels)

    makers = {
        "lens": lambda: va.LensStream(model, positions="image", k=5, labels=labels if lens_labels else None),
        "similarity": lambda: va.SimilarityStream(model, against="text_states"),
        "attention": lambda: va.AttentionStream(model, query="instruction"),
    }
    streams: dict[str, Any] = {}
    hooks: list = []
    results: dict[str, Any] = {}
    for key, make in makers.items():
        try:
            stream = make()
            hooks += stream.hooks(inputs)
            streams[key] = stream
        except Exception as err:
            results[key] = err
    return streams, hooks, results


def pattern_layers_for(model: "HookedVLM", attention_layers: Optional[Sequence[int]]) -> list[int]:
    """The blocks the CircuitsVis view shows: every block of a small model; else first, middle
    and last when heads are few, and only the middle block (where text reads the image) when
    they are many, so the view's window stays wide enough to be useful (see
    attention.DEFAULT_CELL_BUDGET)."""
    n = model.n_layers
    n_heads = int(model.cfg.n_heads)
    if attention_layers:
        return list(attention_layers)
    if n <= 4:
        return list(range(n))
    if 3 * n_heads <= 32:
        return [0, n // 2, n - 1]
    return [n // 2]


def _token_strip(ctx: _Context) -> str:
    layout = ctx.inputs.layout
    answer = layout.answer_mask[0].tolist()
    image = layout.image_mask[0].tolist()
    out, run = [], []

    def flush() -> None:
        if len(run) > 8:
            shown = run[:3] + [None] + run[-2:]
        else:
            shown = run
        for item in shown:
            if item is None:
                out.append(f'<span class="tok img">… {len(run) - 5} more image tokens …</span>')
            else:
                out.append(f'<span class="tok img">{esc(item)}</span>')
        run.clear()

    for pos, tok in enumerate(ctx.tokens):
        if image[pos]:
            run.append(tok)
            continue
        flush()
        cls = "tok ans" if answer[pos] else "tok"
        out.append(f'<span class="{cls}">{esc(tok)}</span>')
    flush()
    return f'<div class="tokens" id="token-strip">{"".join(out)}</div>'


def _tokens_frame(ctx: _Context) -> pd.DataFrame:
    layout = ctx.inputs.layout
    rows = []
    rc = {int(p): (int(r), int(c)) for p, (r, c) in zip(ctx.span.positions.tolist(), ctx.span.row_col.tolist())}
    for pos, tok in enumerate(ctx.tokens):
        segment = next(
            (name for name in ("image", "prefix", "instruction", "answer", "marker") if bool(layout.mask(name)[0, pos])),
            "other",
        )
        r, c = rc.get(pos, (-1, -1))
        rows.append({"pos": pos, "token": tok, "segment": segment, "grid_row": r, "grid_col": c})
    return pd.DataFrame(rows)


def _input_section(ctx: _Context) -> Section:
    buf = ctx.image
    scale = max(1, 256 // max(1, min(buf.size)))
    shown = buf.resize((buf.width * scale, buf.height * scale), PIL.Image.Resampling.NEAREST) if scale > 1 else buf
    import io

    png = io.BytesIO()
    shown.save(png, format="PNG")
    body = figure_block(png.getvalue(), "The image as the model saw it (after the processor's resize and crop).", fig_id="fig-input",
                        guide=FIGURE_GUIDE["fig-input"])
    body += "<h3>Tokens</h3>" + _token_strip(ctx)
    body += '<p class="caption">Image tokens read <code>&lt;img r,c&gt;</code> (row, column on the patch grid) or <code>&lt;q k&gt;</code> (query token k of a connector that reads the image through learned queries); the answer is green.</p>'
    return Section("input", "Input", body, tables={"tokens": _tokens_frame(ctx)})


def _span_slice(values: torch.Tensor, value_positions: torch.Tensor, span: Any) -> torch.Tensor:
    """Values of the span's tokens, picked by sequence position."""
    index = {int(p): i for i, p in enumerate(torch.as_tensor(value_positions).flatten().tolist())}
    missing = [p for p in span.positions.tolist() if p not in index]
    if missing:
        raise ValueError(f"the result has no value for image positions {missing[:5]}...")
    return values[..., [index[p] for p in span.positions.tolist()]]


@_guarded("lens", "Logit lens on visual tokens")
def _lens_section(ctx: _Context) -> Section:
    model = ctx.model
    batched = _result(ctx, "lens")
    result = batched.row(0)
    decode = decoder(model.tokenizer)
    body = figure_block(
        figure_png(lens_panel(result, ctx.inputs.layout, model.tokenizer)),
        "Per layer, the top-1 word the logit lens reads from each visual token, laid out on the image grid.",
        fig_id="fig-lens", guide=FIGURE_GUIDE["fig-lens"], data={"table": "lens"},
    )
    frame = batched.to_frame()
    ids = frame["token_id"].astype(int)
    words = {int(t): decode(int(t)) for t in ids.unique()}
    frame["token"] = ids.map(words)
    tables = {"lens": frame}
    layers = [int(l) for l in result.layers.tolist()]
    if ctx.labels is None:
        body += ('<div class="note" id="lens-no-labels">No match-rate figure: no expected word per image token '
                 "(pass <code>scene=</code> or <code>lens_labels=</code> to <code>build_report</code>; the CLI does "
                 "for its generated scenes).</div>")
    else:
        curves, top1 = _lens_match_curves(ctx, batched)
        body += f'<p class="caption" id="lens-labels">Labels: {esc(ctx.labels.source)}.</p>'
        body += figure_block(
            figure_png(layer_curve(curves, ylabel=f"label in top-{batched.k}", ylim=(0, 1.02),
                                   title="Logit-lens match rate of labelled visual tokens")),
            f"Share of labelled visual tokens whose expected word is among the lens's top-{batched.k}, per layer; "
            "the control shuffles the same labels across the labelled tokens.",
            fig_id="fig-lens-match", guide=FIGURE_GUIDE["fig-lens-match"],
            notes=match_rate_notes(curves, top1, batched.k), data={"table": "lens_match_rate"},
        )
        columns = ["match_rate", "shape_match_rate", "control_match_rate"] if len(curves) == 3 else ["match_rate", "control_match_rate"]
        tables["lens_match_rate"] = pd.DataFrame({"layer": layers, **{col: c.tolist() for col, c in zip(columns, curves.values())}})
    # Which words dominate, per layer: the most frequent top-1 words over the image tokens.
    _, word_grid, prob_grid, _, _ = lens_grid(result, ctx.inputs.layout, model.tokenizer)
    summary = []
    for i, layer in enumerate(layers):
        cells = [w for w in word_grid[i].ravel() if w]
        counts = pd.Series(cells).value_counts().head(3)
        summary.append({
            "layer": layer_labels(len(layers), [layer])[0],
            "top-1 words (count)": ", ".join(f"{w} ({n})" for w, n in counts.items()),
            "mean top-1 prob": float(pd.Series(prob_grid[i].ravel()).mean()),
        })
    body += "<h3>Most frequent top-1 words</h3>" + data_table(pd.DataFrame(summary))
    return Section("lens", "Logit lens on visual tokens", body, tables=tables)


def _lens_match_curves(ctx: _Context, batched: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The match-rate curves of the report's labels, and the last layer's top-1 word at each
    labelled token (for the note when the curves stay at 0)."""
    assert ctx.labels is not None
    in_span = {int(p): i for i, p in enumerate(ctx.span.positions.tolist())}
    row = batched.row(0)
    span_order = [in_span.get(int(p), -1) for p in row.positions.tolist()]
    curves = match_rate_curves(batched, ctx.model.tokenizer, ctx.labels, span_order)
    decode = decoder(ctx.model.tokenizer)
    top1 = [decode(int(row.top_ids[-1, j, 0])) for j, i in enumerate(span_order) if i >= 0 and ctx.labels.words[i] is not None]
    return curves, top1


@_guarded("similarity", "Visual vs text similarity per layer")
def _similarity_section(ctx: _Context) -> Section:
    batched = _result(ctx, "similarity")
    result = batched.row(0)
    body = figure_block(
        figure_png(similarity_figure(batched)),
        "Mean cosine similarity of visual-token states to the instruction's text states, per layer (emb = input embeddings).",
        fig_id="fig-similarity", guide=FIGURE_GUIDE["fig-similarity"], data={"table": "similarity_curve"},
    )
    per_token = _span_slice(result.per_token, result.image_positions, ctx.span)
    chosen = pick_layers(per_token.shape[0], 6)
    panels = [(layer_labels(per_token.shape[0], [l])[0], per_token[l]) for l in chosen]
    body += figure_block(
        figure_png(heatmap_grid(panels, ctx.span, ctx.image, label="cosine to text", cmap="coolwarm")),
        "Per visual token: its similarity to the text, on the image; one colour scale shared by every panel "
        "(the colour bar).",
        fig_id="fig-similarity-map", guide=FIGURE_GUIDE["fig-similarity-map"],
        data={"table": "similarity", "colour-scale": "shared"},
    )
    return Section("similarity", "Visual vs text similarity per layer", body,
                   tables={"similarity": batched.to_frame(), "similarity_curve": batched.curve_frame()})


@_guarded("attention", "Attention from text to the image")
def _attention_section(ctx: _Context) -> Section:
    batched = _result(ctx, "attention")
    result = batched.row(0)
    body = figure_block(
        figure_png(attention_mass_figure(batched)),
        "Share of the instruction tokens' attention that lands on image tokens, per block and head.",
        fig_id="fig-attention-mass", guide=FIGURE_GUIDE["fig-attention-mass"], data={"table": "attention_mass"},
    )
    received = _span_slice(result.received, result.image_positions, ctx.span)
    chosen = pick_layers(received.shape[0], 6)
    panels = [(f"block {l}", received[l]) for l in chosen]
    body += figure_block(
        figure_png(heatmap_grid(panels, ctx.span, ctx.image, label="attention received", shared_range=True)),
        "Attention each image token receives from the instruction (mean over heads and queries), per block; "
        "one colour scale shared by every panel (the colour bar), so blocks compare directly.",
        fig_id="fig-attention-received", guide=FIGURE_GUIDE["fig-attention-received"],
        data={"table": "attention_received", "colour-scale": "shared"},
    )
    tables = {"attention_mass": batched.to_frame(), "attention_received": batched.received_frame()}
    return Section("attention", "Attention from text to the image", body, tables=tables)


@_guarded("patterns", "Attention patterns")
def _patterns_section(ctx: _Context) -> Section:
    layers = ctx.pattern_layers
    view = attention_view(ctx.cache, ctx.tokens, layers=layers, id_prefix="vlens-attn")
    intro = (
        '<p class="caption">CircuitsVis attention heads (hover a thumbnail to zoom, click to lock). '
        "Queries and keys are the same window of tokens; for long inputs the window is the text plus "
        "the image tokens the text attends to most. Below each: tokens coloured by the last token's attention.</p>"
        f'<p class="guide">{esc(FIGURE_GUIDE["patterns"])}</p>'
    )
    return Section("patterns", "Attention patterns", intro + view.fragment, needs_circuitsvis=True)


def count_grid(n: int, full_below: int = 64) -> Optional[list[int]]:
    """Counts for the loss curve: every count for small images, else ~25 spread over 0..n."""
    if n <= full_below:
        return None
    powers = {2**i for i in range(n.bit_length()) if 2**i <= n}
    linear = {round(i * n / 16) for i in range(17)}
    return sorted({0, n} | powers | linear)


@_guarded("count", "Loss vs number of visual tokens")
def _count_section(ctx: _Context) -> Section:
    result = va.token_count_curve(ctx.model, ctx.inputs, counts=count_grid(ctx.span.n_tokens))
    body = figure_block(
        figure_png(count_curve_figure(result)),
        "Loss on the answer when only the first n visual tokens are kept (the rest removed).",
        fig_id="fig-count-curve", guide=FIGURE_GUIDE["fig-count-curve"], data={"table": "count_curve"},
    )
    body += engine_note(result.engine, result.engine_reason)
    frame = result.to_frame()
    body += data_table(frame, max_rows=20)
    return Section("count", "Loss vs number of visual tokens", body, tables={"count_curve": frame})


def engine_note(engine: Optional[str], reason: str) -> str:
    """The token-removal engine a result ran on, and why not ``kv`` (e.g. a prefix-LM)."""
    why = f": {reason}" if reason else ""
    return f"<p>Token removal ran on the <code>{esc(engine)}</code> engine{esc(why)} (the losses are exact either way).</p>"


@_guarded("contributions", "Contribution of each visual token")
def _contribution_section(ctx: _Context) -> Section:
    batched = va.token_contributions(ctx.model, ctx.inputs)
    result = batched.row(0)
    values = _span_slice(result.delta_loss.float(), result.image_positions, ctx.span)
    finite = values[torch.isfinite(values)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    full_loss = float(result.full_loss)
    body = f'<p class="caption" id="sign-convention">{esc(SIGN_CONVENTION)} Full answer loss: {full_loss:.4g} nats.</p>'
    body += figure_block(
        figure_png(image_heatmap(values, ctx.span, ctx.image, title="loss without the token - full loss",
                                 label="delta loss (nats; > 0: the token helps)", cmap="RdBu_r", vmin=-bound, vmax=bound)),
        "Red (> 0): removing the token raises the answer's loss, so the token helps; blue (< 0): removing it "
        "lowers the loss.",
        fig_id="fig-contributions", guide=FIGURE_GUIDE["fig-contributions"],
        notes=contribution_notes(values, full_loss), data={"table": "contributions"},
    )
    body += engine_note(batched.engine, batched.engine_reason)
    if ctx.span.grid is None:
        body += figure_block(
            figure_png(bar_figure(list(ctx.span.labels), values, ylabel="delta loss (nats; > 0: helps)", title="per query token")),
            f"One bar per token ({ctx.span.tokens_name}); > 0: removing the token raises the loss (it helps).",
            fig_id="fig-contributions-bar", guide=FIGURE_GUIDE["fig-contributions-bar"],
            notes=contribution_notes(values, full_loss), data={"table": "contributions"},
        )
    top = _top_contributions(ctx, values)
    body += "<h3>Largest effects</h3>" + data_table(top)
    return Section("contributions", "Contribution of each visual token", body, tables={"contributions": batched.to_frame()})


SIGN_CONVENTION = (
    "Sign convention: delta loss = answer loss without the token minus the full loss; positive = the token helps "
    "(removing it raises the loss), negative = removing it lowers the loss."
)


def _top_contributions(ctx: _Context, values: torch.Tensor, n: int = 8) -> pd.DataFrame:
    """The tokens with the largest effects either way, each with what its sign means."""
    tokens = [ctx.tokens[int(p)] for p in ctx.span.positions.tolist()]
    frame = pd.DataFrame({"token": tokens, "delta loss (nats)": values.tolist()})
    frame = frame.reindex(frame["delta loss (nats)"].abs().sort_values(ascending=False).index).head(n)
    frame["meaning"] = ["helps (removing it raises the loss)" if v > 0 else "removing it lowers the loss" if v < 0 else "no effect"
                        for v in frame["delta loss (nats)"]]
    return frame


def report_inputs(model: "HookedVLM", image: Any, prompt: str, answer: Optional[str] = None, max_new_tokens: int = 20) -> tuple[Any, dict[str, Any]]:
    """Inputs for :func:`build_report`: with the given answer, else the model's own greedy one.

    Returns:
        ``(inputs, meta)``; ``meta["answer source"]`` says where the answer came from.
    """
    if answer is None:
        generated = model.generate(model.prepare(image, prompt), max_new_tokens=max_new_tokens).text[0]
        if not generated.strip():
            from vlens.errors import PromptError

            raise PromptError("the model generated an empty answer; pass one with --answer")
        return model.prepare(image, prompt, answer=generated), {"answer source": "generated by the model (greedy)"}
    return model.prepare(image, prompt, answer=answer), {"answer source": "given"}
