"""HTML pages from the Jinja templates in ``common/templates/``, with every value escaped.

Model-written text (descriptions, keywords, class names from a user's dataset) is untrusted. The
environment made here escapes every ``{{ value }}`` by default (autoescape on for every template),
so a description containing ``<script>`` renders as text; only values explicitly marked safe by
Python code here (``json_for_script``) go out raw. Meant to be the one renderer of the project's
HTML: the atlas (10) uses it, and the debug reports (08) can move to it.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jinja2
from markupsafe import Markup

TEMPLATES = Path(__file__).with_name("templates")  # the only folder holding templates and assets


def fmt_number(value, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` significant decimals, "–" for a missing value."""
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
    return f"{number:.{digits}g}" if abs(number) >= 1 else f"{number:.{digits}f}"


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


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    """The shared Jinja environment: templates from ``TEMPLATES``, autoescape on for all of them.

    ``StrictUndefined`` turns a misspelt variable into an error instead of an empty string.
    """
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = fmt_number
    env.filters["pct"] = fmt_percent
    env.filters["json_script"] = json_for_script
    return env


def render(template: str, **context) -> str:
    """Render ``template`` (a file name under ``TEMPLATES``) with ``context``."""
    return environment().get_template(template).render(**context)


def asset(name: str) -> bytes:
    """The bytes of a static file kept beside the templates (stylesheet, script)."""
    return (TEMPLATES / name).read_bytes()
