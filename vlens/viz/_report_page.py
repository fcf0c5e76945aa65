"""The report's building blocks: its sections, the built page and what it writes, the
context every section builder reads, and the guard that turns a failing builder into a
visible note. ``vlens.viz.report`` and the section modules (``report_causal``,
``report_pruning``) build on it.
"""

from __future__ import annotations

import html
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import pandas as pd
import PIL.Image

from vlens.errors import AnalysisUndefinedError
from vlens.viz._html import esc, page
from vlens.viz._report_notes import LensLabels

if TYPE_CHECKING:
    from vlens.cache import VLMCache
    from vlens.inputs import VLMInputs
    from vlens.model import HookedVLM

DataFormat = Literal["csv", "parquet"]


@dataclass(frozen=True)
class Section:
    """One part of the report.

    Attributes:
        key: Anchor id and data-file prefix.
        title: Heading.
        body: HTML of the section's content.
        tables: Data behind the section, by file stem.
        problem: Why the section is incomplete (None when it is complete).
        needs_circuitsvis: Whether ``body`` renders CircuitsVis components.
    """

    key: str
    title: str
    body: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    problem: Optional[str] = None
    needs_circuitsvis: bool = False


@dataclass(frozen=True)
class Report:
    """A built report: the page and the tables behind it."""

    title: str
    sections: tuple[Section, ...]
    meta: dict[str, Any]

    @property
    def problems(self) -> dict[str, str]:
        """Section title -> why it is incomplete."""
        return {s.title: s.problem for s in self.sections if s.problem}

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        out: dict[str, pd.DataFrame] = {}
        for s in self.sections:
            out.update(s.tables)
        return out

    def to_html(self) -> str:
        """The whole report as one HTML document (no external resource)."""
        from vlens.viz._circuitsvis import bundle_script

        head = bundle_script() if any(s.needs_circuitsvis for s in self.sections) else ""
        toc = " ".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in self.sections)
        meta_rows = "".join(
            f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>' for k, v in self.meta.items()
        )
        parts = [
            f"<h1>{esc(self.title)}</h1>",
            f'<table class="data" id="meta">{meta_rows}</table>',
            f'<nav class="toc">{toc}</nav>',
        ]
        if self.problems:
            items = "".join(f"<li>{esc(t)}: {esc(p)}</li>" for t, p in self.problems.items())
            parts.append(f'<div class="note" id="problems"><b>Incomplete sections</b><ul>{items}</ul></div>')
        for s in self.sections:
            note = f'<div class="note skipped">{esc(s.problem)}</div>' if s.problem else ""
            parts.append(f'<section id="{esc(s.key)}"><h2>{esc(s.title)}</h2>{note}{s.body}</section>')
        parts.append(
            '<p class="caption">Written by vlens. Tables behind every figure are in the data files next to this page.</p>'
        )
        return page(self.title, "\n".join(parts), head_extra=head)

    def write(self, out_dir: Union[str, Path], data_format: DataFormat = "csv") -> dict[str, Path]:
        """Write ``report.html`` and ``data/<table>.csv`` (or ``.parquet``) into ``out_dir``.

        Returns:
            Name -> written path (``"report"`` for the page).
        """
        if data_format not in ("csv", "parquet"):
            from vlens.errors import AnalysisInputError

            raise AnalysisInputError(f"data_format must be 'csv' or 'parquet', got {data_format!r}")
        out = Path(out_dir)
        (out / "data").mkdir(parents=True, exist_ok=True)
        written = {"report": out / "report.html"}
        written["report"].write_text(self.to_html(), encoding="utf-8")
        for name, frame in self.tables.items():
            path = out / "data" / f"{name}.{data_format}"
            if data_format == "csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            written[name] = path
        return written


@dataclass
class _Context:
    model: "HookedVLM"
    inputs: "VLMInputs"
    cache: "VLMCache"  # the attention patterns of pattern_layers only
    tokens: list[str]
    span: Any
    image: PIL.Image.Image
    pattern_layers: list[int]
    results: dict[str, Any]  # stream name -> its per-example result, or the error it raised
    labels: Optional[LensLabels] = None  # the lens's expected words, and where they came from


def _result(ctx: _Context, key: str) -> Any:
    found = ctx.results[key]
    if isinstance(found, Exception):
        raise found
    return found


def _guarded(key: str, title: str) -> Callable:
    """Turn a section builder into one that reports a failure visibly."""

    def wrap(build: Callable[[_Context], Section]) -> Callable[[_Context], Section]:
        def run(ctx: _Context) -> Section:
            try:
                return build(ctx)
            except AnalysisUndefinedError as err:  # not a failure: the model gives it no meaning
                return Section(key, title, f'<p class="note">Not defined for this model: {html.escape(str(err))}</p>')
            except Exception as err:  # one failing analysis must not lose the others
                detail = html.escape("".join(traceback.format_exception_only(type(err), err)).strip())
                return Section(
                    key,
                    title,
                    f'<pre class="error">{detail}</pre>',
                    problem=f"Failed: {type(err).__name__}: {err}",
                )

        return run

    return wrap
