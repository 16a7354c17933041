"""Pages and reports from the Jinja templates in ``common/templates/``, with every value escaped.

The one renderer of the project: the atlas (10), the debug reports (08), the audit reports (13)
and the search page (07) all go through ``render``. Model-written text (descriptions, keywords,
class names from a user's dataset) is untrusted, so every ``{{ value }}`` is escaped by default:

- ``.html`` templates escape for HTML (autoescape on), so a description containing ``<script>``
  renders as text; only values explicitly marked safe by Python code here (``json_for_script``)
  go out raw.
- ``.md`` templates escape for Markdown (``md_text`` on every value), so a description that is a
  Markdown link, image or raw HTML shows as text; only ``md_url`` (a percent-encoded relative
  link made here) goes out raw.

Self-contained reports embed their images with the ``data_uri`` filter and inline the atlas's
stylesheet (``report_base.html``), so they look like the atlas and open anywhere.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import logging
import math
import os
import re
import urllib.parse
from pathlib import Path

import jinja2
from markupsafe import Markup

from common.glossary import term

log = logging.getLogger("neuron-atlas.render")

TEMPLATES = Path(__file__).with_name("templates")  # the only folder holding templates and assets
THUMB_PX = 384  # default longest side of an image embedded in a self-contained page


def fmt_number(value, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` significant decimals, "–" for a missing value.

    Values below 10^-3 keep ``digits`` significant digits in exponent form (a q-value of 2e-7
    must not read 0.000).
    """
    if value is None or value == "":
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "–"
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    if abs(number) >= 1 or math.isinf(number):
        return f"{number:.{digits}g}"
    return f"{number:.{digits}g}" if abs(number) < 1e-3 else f"{number:.{digits}f}"


def fmt_percent(value) -> str:
    """A share in [0, 1] as a percentage with one decimal; "–" when missing."""
    if value is None or value == "":
        return "–"
    return f"{100 * float(value):.1f}%"


def json_for_script(obj) -> Markup:
    """``obj`` as JSON that is safe inside a ``<script>`` element or a ``.js`` file.

    ``<``, ``>`` and ``&`` become ``\\u`` escapes, so no string can close the element or open a
    comment; U+2028/U+2029 are escaped because older JavaScript treats them as line ends.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return Markup(text)


def data_uri(path, max_px: int = THUMB_PX, photo: bool = True) -> str | None:
    """The image at ``path`` shrunk to ``max_px`` as a ``data:`` URI; None without a readable
    image (logged), so that a template can show a placeholder.

    ``photo`` images (mosaics, crops) become JPEG, which keeps a page of many of them small;
    plots stay PNG so that their lines and text remain sharp.
    """
    if not path:
        return None
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


def relative_url(path, folder) -> str:
    """``path`` as a link from a page in ``folder``: relative, forward slashes, percent-encoded
    (a space, quote or parenthesis in a file name cannot end the link or the attribute)."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()
    return urllib.parse.quote(rel)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>!|~#])")  # marks that make links, images, HTML


def md_text(value) -> str:
    """Text shown literally by a Markdown viewer: on one line, with every mark that could make
    a link, an image, raw HTML, code, emphasis or a table cell border backslash-escaped (model
    text is untrusted: ``[x](javascript:…)``, ``![](http://…)``, ``<img src=…>``)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _md_finalize(value):
    """Every ``{{ value }}`` of a Markdown template: escaped by ``md_text`` unless made safe here
    (``md_url``)."""
    return value if isinstance(value, Markup) else md_text("" if value is None else value)


def md_url(path, folder) -> Markup:
    """A relative link target for a Markdown template (see ``relative_url``), emitted as is."""
    return Markup(relative_url(path, folder))


def _filters(env: jinja2.Environment) -> jinja2.Environment:
    """Register the filters shared by the HTML and Markdown environments."""
    env.filters.update(num=fmt_number, pct=fmt_percent, json_script=json_for_script,
                       data_uri=data_uri, rel=relative_url, md_url=md_url)
    env.globals["inline_css"] = inline_css
    env.globals["term"] = term  # a score's plain name and tooltip (common/glossary.py)
    return env


@functools.lru_cache(maxsize=None)
def environment(markdown: bool = False) -> jinja2.Environment:
    """The shared Jinja environment for HTML (autoescape on) or for Markdown (``md_text`` on
    every value), templates from ``TEMPLATES``.

    ``StrictUndefined`` turns a misspelt variable into an error instead of an empty string.
    """
    options = dict(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    if markdown:
        return _filters(jinja2.Environment(autoescape=False, finalize=_md_finalize, **options))
    return _filters(jinja2.Environment(autoescape=True, **options))


def render(template: str, **context) -> str:
    """Render ``template`` (a file name under ``TEMPLATES``; ``.md`` ones escape for Markdown)
    with ``context``. Callers name the template literally: tools/deps.py finds a script's
    templates by their quoted names, for the Makefile's prerequisites."""
    return environment(template.endswith(".md")).get_template(template).render(**context)


def asset(name: str) -> bytes:
    """The bytes of a static file kept beside the templates (stylesheet, script)."""
    return (TEMPLATES / name).read_bytes()


def inline_css() -> Markup:
    """The atlas's stylesheet, for the ``<style>`` element of a self-contained report."""
    return Markup(asset("atlas.css").decode("utf-8").replace("</", "<\\/"))


# ---------------------------------------------------------------------------------------------
# Reports: a list of blocks, written once as report.md and once as a self-contained report.html
# (``report.md`` / ``report.html`` templates), so that both say the same thing. Block text is
# plain text: the templates escape it.


def heading(text: str, level: int = 2) -> dict:
    """A heading block (level 1 is the report's title)."""
    return {"kind": "heading", "level": int(level), "text": text}


def paragraph(text: str) -> dict:
    """A paragraph block."""
    return {"kind": "paragraph", "text": text}


def note(text: str) -> dict:
    """A highlighted remark (a caveat the reader must see)."""
    return {"kind": "note", "text": text}


def figure(path, caption: str, photo: bool = True, max_px: int = 900) -> dict:
    """An image with a caption: embedded in the HTML (JPEG for ``photo``, else PNG), linked from
    the Markdown."""
    return {"kind": "figure", "path": path, "caption": caption, "photo": photo, "max_px": max_px}


def table(columns, rows, numeric=(), image: str | None = None, thumb_px: int = 320,
          embed: bool = True, link: str | None = None, href: str = "_href") -> dict:
    """A table of ``rows`` (dicts) in ``columns`` order; ``numeric`` columns are right-aligned;
    the ``image`` column holds image paths (or None), shown as ``thumb_px`` thumbnails embedded
    in the page, or with ``embed=False`` linked relative to the page's folder. The ``link``
    column links to the atlas page that each row's ``href`` field names (a path inside the
    atlas) where the page is rendered inside the atlas (``link_root`` of the templates), and is
    plain text elsewhere."""
    return {"kind": "table", "columns": list(columns), "rows": list(rows),
            "numeric": set(numeric), "image": image, "thumb_px": thumb_px, "embed": embed,
            "link": link, "href": href}


def html_page(title: str, blocks: list[dict], folder: Path) -> str:
    """``blocks`` as one HTML page styled like the atlas, for a file in ``folder`` (the folder
    that links to images not embedded are relative to)."""
    return render("report.html", blocks=blocks, title=title, folder=folder)


def report_paths(folder: Path) -> tuple[Path, Path]:
    """The report.md and report.html that ``write_report`` writes in ``folder``."""
    return Path(folder) / "report.md", Path(folder) / "report.html"


def write_report(folder: Path, title: str, blocks: list[dict]) -> list[Path]:
    """Write ``folder``/report.md (images linked relative to it) and report.html (images
    embedded) atomically; return both paths."""
    from common.io import write_text
    folder = Path(folder)
    md, page = report_paths(folder)
    write_text(md, render("report.md", blocks=blocks, folder=folder))
    write_text(page, html_page(title, blocks, folder))
    return [md, page]
