"""The pages every report writes: report.md (figures beside it as PNGs) and report.html, one
self-contained page (figures embedded) with the same look for every kind of report."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .. import filenames as files
from ..storage import atomic_write_text


def bold(escaped: str) -> str:
    """Markdown **bold** in an already escaped line -> <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)


def markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def markdown_figures(figs: list[tuple[str, Path]]) -> list[str]:
    """Each figure under its caption, the PNG beside report.md."""
    md = []
    for caption, p in figs:
        md += [f"### {caption}", "", f"![{caption}]({p.name})", ""]
    return md


def results_table_html(head: list[str], body: list[list[str]]) -> str:
    """The experiment's table; a row whose last cell is SUSPECT (the gate tripped) is marked."""
    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(
        "<tr"
        + (' class="suspect"' if r[-1] == "SUSPECT" else "")
        + ">"
        + "".join(f"<td>{esc(c)}</td>" for c in r)
        + "</tr>"
        for r in body
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>"


def plain_table_html(head: list[str], body: list[list[str]]) -> str:
    """A small table: a header row, then the rows."""
    esc = html.escape
    return (
        "<table>"
        + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{esc(x)}</{'th' if i == 0 else 'td'}>" for x in r) + "</tr>"
            for i, r in enumerate([head, *body])
        )
        + "</table>"
    )


def figures_html(figs: list[tuple[str, Path]]) -> str:
    """The figures, embedded as data URIs, in a grid."""
    esc = html.escape
    return (
        "<div class='figs'>"
        + "".join(
            f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' alt='{esc(c)}'>"
            f"<figcaption>{esc(c)}</figcaption></figure>"
            for c, p in figs
        )
        + "</div>"
    )


def page(title: str, blocks: list[str]) -> str:
    """The one HTML page of every report: the lead in a box, a table that scrolls instead of squeezing,
    figures in a grid that uses the width of the page."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1.5em;color:#222}"
        ".lead{background:#eef5ff;border-left:4px solid #3b7dd8;padding:.4em 1em;font-size:16px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}"
        "td:nth-child(2){min-width:18em;max-width:32em}tr.suspect{background:#fde2e2}.scroll{overflow-x:auto}"
        ".figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:1em}"
        "figure{margin:0}figure img{width:100%;height:auto}figcaption{font-size:13px;color:#555}"
        ".note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:1em;font-size:13px;overflow-x:auto}"
        "</style></head><body>" + "".join(blocks) + "</body></html>"
    )


def write_pages(folder: Path, md: list[str], title: str, blocks: list[str]) -> dict[str, Path]:
    """Write report.md (its lines) and report.html (the page of `blocks`) into `folder`."""
    atomic_write_text(folder / files.REPORT_MD, "\n".join(md) + "\n")
    atomic_write_text(folder / files.REPORT_HTML, page(title, blocks))
    return report_paths(folder)


def report_paths(folder: Path) -> dict[str, Path]:
    """Where a folder's report is: {"html": report.html, "md": report.md}."""
    return {"html": folder / files.REPORT_HTML, "md": folder / files.REPORT_MD}
