"""report.html: the Markdown report as one self-contained page, rendered by a Jinja2 template
(pipeline/reporting/templates/report.html.j2).

The page is made from report.md itself, block by block, so that every section the report's `render()`
writes (and any section added to it later) shows up in the HTML without touching the template: headings,
paragraphs, pipe tables and images (PNGs embedded), with `code` spans and [links](href) inside them.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
IMAGE = re.compile(r"!\[([^]]*)\]\(([^)]*)\)")
SEPARATOR = re.compile(r"^\|[-:| ]+\|$")


def blocks(markdown: str) -> list[dict]:
    """The report as a list of blocks: heading (level, text, anchor), paragraph (text), table (header,
    rows) and image (alt, name)."""
    out: list[dict] = []
    table: list[str] = []

    def flush_table() -> None:
        rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table
                if not SEPARATOR.match(row.strip())]
        if rows:
            out.append({"kind": "table", "header": rows[0], "rows": rows[1:]})
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = IMAGE.fullmatch(line.strip())
        if image:
            out.append({"kind": "image", "alt": image.group(1), "name": image.group(2)})
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            text = line[level:].strip()
            out.append({"kind": "heading", "level": level, "text": text, "anchor": anchor(text)})
        elif line.strip():
            out.append({"kind": "paragraph", "text": line})
    flush_table()
    return out


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def inline(text: str):
    """Escaped text with `code` spans and [text](href) links as HTML."""
    from markupsafe import Markup, escape

    html = str(escape(text))
    html = re.sub(r"`([^`]*)`", r"<code>\1</code>", html)
    html = re.sub(r"\[([^]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', html)
    return Markup(html)


def render_html(markdown: str, images: dict[str, str]) -> str:
    """The page: `images` maps an image's name in the Markdown to the PNG embedded in its place."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                                     lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["inline"] = inline
    parts = blocks(markdown)
    for block in parts:
        if block["kind"] == "image" and block["name"] in images:
            block["data"] = base64.b64encode(Path(images[block["name"]]).read_bytes()).decode()
    title = next((b["text"] for b in parts if b["kind"] == "heading"), "Report")
    contents = [b for b in parts if b["kind"] == "heading" and b["level"] == 2]
    return environment.get_template("report.html.j2").render(title=title, blocks=parts, contents=contents)
