"""The one HTML page shell of moesift: a self-contained page (plotly.js inlined once), its sections, and
small helpers for tables and figures. Every page moesift writes (report, sweep, demo) is built here."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
         "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
         "h1{font-size:1.4em}h2{font-size:1.2em;margin-top:2em}.front{font-weight:bold}")


def esc(x: Any) -> str:
    """HTML-escaped text of `x`."""
    return html.escape(str(x))


def plotly_js() -> str:
    """plotly.js, to inline once per page (pages open offline)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page(title: str, sections: Sequence[str], intro: str = "", plotlyjs: str | None = None) -> str:
    """A self-contained page: the title, `intro` and `sections` (HTML fragments), plotly.js inlined once
    (`plotlyjs`, or the installed plotly's when None; pass "" for a page without figures)."""
    js = plotly_js() if plotlyjs is None else plotlyjs
    script = f'<script type="text/javascript">{js}</script>' if js else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n{script}</head>\n<body><h1>{esc(title)}</h1>{intro}\n"
            f"{''.join(sections)}\n</body></html>\n")


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw`."""
    cell = (lambda v: str(v)) if raw else esc
    h = "".join(f"<th>{esc(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def figure(fig: Any, name: str) -> str:
    """A plotly figure as a page fragment (plotly.js comes from the page)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config={"displaylogo": False})
