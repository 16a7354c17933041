"""Showing neurons to people: plain text for terminals and small HTML builders.

Used by the stages that print or render lists of neurons (07 search, 08 debug). Descriptions are
written by a model, so they are untrusted text: every builder here escapes what it is given, and
only HTML made by these functions themselves (image tags) is inserted raw.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("neuron-atlas.report")

THUMB_PX = 384  # longest side of an image embedded in a self-contained HTML page

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}
th,td{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%} .note{background:#fff7d6;padding:.5em .8em;border-left:4px solid #e0b400}
code{background:#f3f3f3;padding:0 .2em}
"""


def plain_text(text: str) -> str:
    """``text`` with its control and format characters (terminal escape codes, bidirectional
    overrides, zero-width characters) turned into spaces and all whitespace squeezed to single
    spaces: safe to print on a terminal or to keep as a description."""
    return " ".join("".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch
                            for ch in str(text)).split())


def class_folder(name: str) -> str:
    """A class name as the name of its report folder (13's audit reports, the atlas's copies)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._") or "class"


def esc(value) -> str:
    """HTML-escaped text of any value (quotes included, so it is safe inside attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def image_data_uri(path: str | Path, max_px: int = THUMB_PX, photo: bool = True) -> str | None:
    """The image at ``path`` shrunk to ``max_px`` as a ``data:`` URI, or None if it cannot be read.

    ``photo`` images (mosaics, crops) become JPEG, which keeps a page of many of them small;
    plots stay PNG so that their lines and text remain sharp.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            img.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            if photo:
                img.convert("RGB").save(buf, format="JPEG", quality=85)
            else:
                img.save(buf, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError) as err:
        log.warning("cannot embed image %s: %s", path, err)
        return None
    mime = "image/jpeg" if photo else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def img_tag(path: str | Path | None, alt: str, embed: bool, relative_to: str | Path | None = None,
            max_px: int = THUMB_PX, photo: bool = True) -> str:
    """An ``<img>`` for ``path``: embedded as a data URI, or linked relative to ``relative_to``.

    Returns an escaped placeholder text when there is no image.
    """
    if path is None:
        return "<em>(no image)</em>"
    if embed:
        src = image_data_uri(path, max_px, photo)
        if src is None:
            return "<em>(image unreadable)</em>"
    else:
        src = os.path.relpath(os.path.abspath(path), os.path.abspath(relative_to or "."))
        src = Path(src).as_posix()
    return f'<img src="{esc(src)}" alt="{esc(alt)}" loading="lazy">'


def html_table(columns: Sequence[str], rows: Iterable[Mapping], raw: Iterable[str] = (),
               numeric: Iterable[str] = ()) -> str:
    """A table of ``rows`` (dicts) in ``columns`` order; every cell is escaped except ``raw`` ones.

    ``raw`` columns must hold HTML made by this module (``img_tag``); ``numeric`` columns are
    right-aligned.
    """
    raw, numeric = set(raw), set(numeric)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            text = value if col in raw else esc(value)
            cls = ' class="num"' if col in numeric else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (inline CSS, no scripts) around ``body``."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            f"</body></html>\n")


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>!|~#])")  # marks that make links, images, HTML


def md_text(value) -> str:
    """Text shown literally by a Markdown viewer: on one line, with every mark that could make
    a link, an image, raw HTML, code, emphasis or a table cell border backslash-escaped (model
    text is untrusted: ``[x](javascript:…)``, ``![](http://…)``, ``<img src=…>``)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))
