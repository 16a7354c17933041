"""Which files of common/ each script depends on, for the Makefile's prerequisites.

A script depends on every ``common`` module it imports, at the top or inside a function, directly
or through other common modules, and on the data files those modules read. The import statements
are parsed with ``ast`` (nothing is imported, so make stays fast and needs no .venv). A module
reads a data file of common/ when its source quotes the file's bare name (for example
``Path(__file__).with_name("names.tsv")``). Templates and page assets in ``common/templates/`` are
counted the same way, per file, from the script and its modules (``render("atlas_run.html")``,
``asset("atlas.css")``), with the templates those name in turn (``{% extends "base.html" %}``);
so editing an atlas page re-runs the atlas, not 08, whose reports use ``report.html``. Templates
are therefore always named literally. Every module depends on ``common/__init__.py``, which Python
runs before any of them. The default prompt file ``common/prompts.yaml`` counts for the scripts
that describe (common/describers.py names it), besides the ``$(PROMPTS)`` the Makefile lists.

    python3 -m tools.deps              one line, script:file,file,… for every NN_*.py and common/*.py
    python3 -m tools.deps 06_trace.py  the common/ files of one script, one per line

The standard library only: make runs this with the system python, before .venv exists.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "common"
IMPORT_LINE = re.compile(r"[ \t]*(from|import)[ \t].*\bcommon\b")  # may start an import of common
TEMPLATES = ROOT / PACKAGE / "templates"  # the pages and assets common/render.py loads
QUOTED_NAME = re.compile(r"""["']([A-Za-z0-9_][A-Za-z0-9_.-]*)["']""")  # "name.tsv", no path


@functools.lru_cache(maxsize=None)
def _source(path: Path) -> str:
    """The text of ``path`` (read once: modules are shared by many scripts)."""
    return path.read_text(encoding="utf-8")


def _import_statements(source: str):
    """The parsed import statements of ``source`` that mention ``common``, wherever they stand.

    Parsing whole files took most of make's start-up time, so only the lines that start an
    import mentioning common are parsed, with their continuation lines (up to the closing
    parenthesis, or while a line ends with a backslash). Prose that looks like an import in a
    docstring does not parse and is skipped.
    """
    lines = source.splitlines()
    for start, line in enumerate(lines):
        if not IMPORT_LINE.match(line):
            continue
        end = start
        while end + 1 < len(lines) and (lines[end].rstrip().endswith("\\") or (
                "(" in line and ")" not in "".join(lines[start:end + 1]))):
            end += 1
        try:
            yield from ast.parse(textwrap.dedent("\n".join(lines[start:end + 1]))).body
        except SyntaxError:
            continue


@functools.lru_cache(maxsize=None)
def imported_modules(source: Path) -> frozenset[str]:
    """Names of the common modules ``source`` imports anywhere in its body (``common.x`` → x)."""
    found = set()
    for node in _import_statements(_source(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from common import x`` imports the module x; ``from common.x import y`` imports x.
            names = ([f"{node.module}.{alias.name}" for alias in node.names]
                     if node.module == PACKAGE else [node.module])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and \
                    (ROOT / PACKAGE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def template_files(source: Path) -> frozenset[Path]:
    """The files of ``TEMPLATES`` whose bare name ``source`` quotes, with those the quoted
    templates name in turn (``extends``, ``include``, ``import``), followed to the end."""
    out: set[Path] = set()
    todo = [source]
    while todo:
        for name in set(QUOTED_NAME.findall(_source(todo.pop()))):
            target = TEMPLATES / name
            if target.is_file() and target not in out:
                out.add(target)
                todo.append(target)
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def data_files(module: Path) -> frozenset[Path]:
    """The files of common/ whose bare name ``module`` quotes, and its templates."""
    out = set(template_files(module))
    for name in set(QUOTED_NAME.findall(_source(module))):
        target = ROOT / PACKAGE / name
        if not name.endswith(".py") and target.is_file():
            out.add(target)
    return frozenset(out)


def common_files(script: Path) -> list[str]:
    """Every file of common/ that ``script`` depends on (see the module docstring), as sorted
    paths relative to the repository root."""
    script = script if script.is_absolute() else ROOT / script
    todo = set(imported_modules(script))
    if script.parent == ROOT / PACKAGE:  # a common module run as ``-m common.x`` is one itself
        todo.add(script.stem)
    done: set[str] = set()
    files: set[Path] = set(template_files(script))  # a stage names its own page templates
    while todo:
        name = todo.pop()
        done.add(name)
        module = ROOT / PACKAGE / f"{name}.py"
        files |= {module, *data_files(module)}
        todo |= imported_modules(module) - done
    if files:
        files.add(ROOT / PACKAGE / "__init__.py")
    return sorted(str(p.relative_to(ROOT)) for p in files)


def scripts() -> list[Path]:
    """The stage scripts (``NN_name.py``), the common modules and the tools: what make may run."""
    return sorted(ROOT.glob("[0-9][0-9]_*.py")) + sorted((ROOT / PACKAGE).glob("*.py")) + \
        sorted((ROOT / "tools").glob("*.py"))


def main(argv: list[str] | None = None) -> None:
    """Print the given scripts' common/ files, or the table of every script for the Makefile."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("\n".join(sorted({f for script in argv for f in common_files(Path(script))})))
        return
    print(" ".join(f"{p.relative_to(ROOT)}:{','.join(common_files(p))}" for p in scripts()))


if __name__ == "__main__":
    main()
