"""The self-contained HTML page: inline CSS, PNGs as base64 data URIs, no scripts, no external links."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from reports.tables import escape

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 color:#1d2330;background:#fafbfc;line-height:1.45}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:1.7em;margin:.3em 0 .1em}h2{font-size:1.35em;border-bottom:2px solid #d5dae3;padding-bottom:3px;
 margin-top:1.8em}h3{font-size:1.1em;margin:1.3em 0 .3em}
p.meta,.note{color:#555f70;font-size:.9em}
nav{background:#fff;border:1px solid #e1e5ec;border-radius:6px;padding:8px 14px;margin:12px 0;font-size:.92em}
nav ul{margin:4px 0;padding-left:18px;columns:2}nav a{color:#24558f;text-decoration:none}
.proto{background:#eef3fa;border-left:4px solid #5b8fd0;padding:6px 10px;font-size:.88em;margin:6px 0}
.scroll{overflow-x:auto;margin:6px 0 4px}
table.tbl{border-collapse:collapse;font-size:.8em;background:#fff;white-space:nowrap}
table.tbl th{background:#2f3f57;color:#fff;padding:5px 7px;text-align:left;white-space:normal;vertical-align:bottom}
table.tbl td{padding:4px 7px;border-bottom:1px solid #e6e9ef}
table.tbl tr:nth-child(even) td{background:#f5f7fa}
table.lb tr:first-child td{font-weight:600}
figure{margin:14px 0;background:#fff;border:1px solid #e1e5ec;border-radius:6px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.85em;color:#555f70;margin-top:4px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:.88em}
dl.kv dt{font-weight:600}dl.kv dd{margin:0;word-break:break-all}
"""


def png_img(png: bytes, alt: str) -> str:
    """An <img> whose source is the PNG itself (data URI), so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def figure(png: bytes | None, caption: str) -> str:
    if not png:
        return ""
    return f"<figure>{png_img(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"


@dataclass
class Section:
    """A top-level section: its anchor, heading and body HTML (already escaped)."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)


def definition_list(items: dict[str, str]) -> str:
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items.items())
    return f'<dl class="kv">{rows}</dl>'


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole document; the navigation uses in-page anchors only."""
    nav = "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{escape(s.anchor)}"><h2>{escape(s.title)}</h2>{"".join(s.body)}</section>'
                   for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1><p class=\"meta\">{escape(subtitle)}</p>"
            f"<nav><strong>Contents</strong><ul>{nav}</ul></nav>{body}</main></body></html>\n")
