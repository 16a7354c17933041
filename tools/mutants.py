"""Mutation testing of the core modules (`make mutants`): how many small planted bugs the tests catch.

Cosmic Ray (requirements-dev.txt) makes the mutants: each is one small change to one module — an
operator swapped, a comparison turned, a number changed, a condition negated, a loop skipped. Which
modules, which of their functions, and which test files judge each module are set in
tools/mutants.toml. All mutants of those functions are listed, a fixed-seed random sample of them
is drawn (the same sample every run while the code stays the same), and each mutant is applied in
turn to a copy of the project (data/mutants/tree, tree1, …: the working tree's files, one copy per
worker, so the checkout is never touched) and judged by its module's test files only, run with
`pytest -x` and a time limit per mutant; ``workers`` mutants are judged side by side. A mutant is killed when a test fails (or the run passes its time limit), survives when all
pass. Mutants that break the module outright (Cosmic Ray's "incompetent") are counted apart and not
in the score; mutants inside type annotations of modules with ``from __future__ import annotations``
are not made at all (never evaluated, so no test could catch them).

The score, the sample and each survivor — file:line, the change, and the verdict: "needs a test",
or why it is equivalent or not worth a test (tools/mutants.toml [[known]]) — go into a new dated
section at the top of "Mutation testing" in bench/RESULTS.md. The score is given twice: killed over
all judged mutants, and killed over those not judged equivalent (the usual definition of the
mutation score: an equivalent mutant computes the same results, so no test can kill it). A
survivor counts as equivalent only when tools/mutants.toml says so, with its reason, before the run;
"not worth a test" stays in both denominators.

    python -m tools.mutants                       the sample of tools/mutants.toml
    python -m tools.mutants --sample 20 --only common/scores.py --no-write   a quick look
"""
from __future__ import annotations

import argparse
import ast
import datetime
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from xml.etree import ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.io import write_text  # noqa: E402  (after the project root is on the path)

CONFIG = ROOT / "tools" / "mutants.toml"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## Mutation testing"
MARKER = "<!-- make mutants inserts new sections below this line -->"
INTRO = f"""{HEADING}

`make mutants` (tools/mutants.py, configured in tools/mutants.toml) plants small bugs in the core
modules one at a time and runs each module's own test files against them; a section per run, the
newest first: the score on a fixed-seed sample, and every mutant the tests let through with the
verdict on it.

{MARKER}
"""


@dataclass
class Module:
    """One mutated module: its path, the top-level functions/classes mutated (all when empty,
    less ``skip``), and the pytest arguments of the tests that judge it."""
    path: str
    tests: list[str]
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """One sampled mutant and what the tests did to it."""
    spec: object  # cosmic_ray.work_item.MutationSpec
    module: Module
    state: str  # killed | timeout | survived | incompetent | no-test | not run
    before: str = ""
    after: str = ""
    seconds: float = 0.0


def read_config(path: Path) -> dict:
    """tools/mutants.toml as a dict, with its modules as ``Module``s."""
    config = tomllib.loads(path.read_text())
    config["module"] = [Module(**m) for m in config.get("module", [])]
    return config


def top_level_names(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of each top-level function and class of a module."""
    spans = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans.append((first, node.end_lineno, node.name))
    return spans


def owner(spans: list[tuple[int, int, str]], line: int) -> str | None:
    """The top-level function or class holding ``line`` (None: module level)."""
    return next((name for first, last, name in spans if first <= line <= last), None)


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of the type annotations of a module that has
    ``from __future__ import annotations``: they are never evaluated, so a mutant inside one can
    never be caught (no span otherwise)."""
    tree = ast.parse(source)
    future = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                 and any(a.name == "annotations" for a in node.names) for node in tree.body)
    if not future:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in found if n]


def all_mutants(modules: list[Module], skip_operators: list[str]) -> list[tuple[object, Module]]:
    """Every Cosmic Ray mutation of the chosen functions of ``modules`` (paths relative to the
    current folder) by the operators whose names match none of ``skip_operators`` (regular
    expressions), in a stable order; none inside a type annotation that is never evaluated."""
    import cosmic_ray.plugins
    from cosmic_ray.ast import ast_nodes, get_ast_from_path
    from cosmic_ray.work_item import MutationSpec

    operators = []
    for name in cosmic_ray.plugins.operator_names():
        kind = cosmic_ray.plugins.get_operator(name)
        if not kind.arguments() and not any(re.search(p, name) for p in skip_operators):
            operators.append((name, kind()))
    found = []
    for module in modules:
        source = Path(module.path).read_text()
        spans, notes = top_level_names(source), annotation_spans(source)
        nodes = list(ast_nodes(get_ast_from_path(Path(module.path))))
        for name, operator in operators:
            positions = [pos for node in nodes for pos in operator.mutation_positions(node)]
            for occurrence, (start, end) in enumerate(positions):
                where = owner(spans, start[0])
                if where is None or where in module.skip or (module.only
                                                             and where not in module.only):
                    continue
                if any(first <= tuple(start) < last for first, last in notes):
                    continue
                found.append((MutationSpec(module_path=module.path, operator_name=name,
                                           occurrence=occurrence, start_pos=start, end_pos=end),
                              module))
    found.sort(key=lambda pair: (pair[0].module_path.as_posix(), pair[0].start_pos,
                                 pair[0].operator_name, pair[0].occurrence))
    return found


def copy_tree(dest: Path) -> None:
    """The project's files as they are in the working tree (tracked and new, not ignored) copied
    to ``dest``, with a link to .venv: the mutants never touch the checkout."""
    if dest.exists():
        shutil.rmtree(dest)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def test_command(module: Module) -> str:
    """The pytest run that judges a mutant of ``module``: its tests only, stopping at the first
    failure, without caches."""
    return shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                       *module.tests])


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and added lines of a one-hunk unified diff, stripped."""
    lines = diff.splitlines()
    before = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    after = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(before), " / ".join(after)


def _take_tree(trees) -> None:
    """Worker start: claim one copy of the project (from the queue ``trees``) and work in it."""
    os.chdir(trees.get())


def judge(job: tuple[object, Module, float, float]) -> Outcome:
    """Apply one mutant in this worker's copy of the project, run its module's tests, and
    return the outcome ('not run' when the time budget had run out before it started)."""
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    spec, module, timeout, deadline = job
    if time.monotonic() > deadline:
        return Outcome(spec, module, "not run")
    began = time.monotonic()
    result = mutate_and_test([spec], test_command(module), timeout)
    outcome = Outcome(spec, module, "", seconds=time.monotonic() - began)
    if result.worker_outcome == WorkerOutcome.NO_TEST:
        outcome.state = "no-test"
    elif result.test_outcome == TestOutcome.INCOMPETENT:
        outcome.state = "incompetent"
    elif result.test_outcome == TestOutcome.SURVIVED:
        outcome.state = "survived"
    else:
        outcome.state = "timeout" if result.output == "timeout" else "killed"
    outcome.before, outcome.after = changed_lines(result.diff or "")
    return outcome


def run_sample(sample: list[tuple[object, Module]], trees: list[Path], timeouts: dict[str, float],
               budget: float) -> list[Outcome]:
    """Judge each mutant of ``sample`` in one of ``trees`` (one worker process per copy of the
    project, so mutants judged side by side never see each other's change); mutants not started
    within ``budget`` seconds are left 'not run'. Outcomes come back in the sample's order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    for tree in trees:
        queue.put(str(tree))
    deadline = time.monotonic() + budget
    jobs = [(spec, module, timeouts[module.path], deadline) for spec, module in sample]
    outcomes = []
    with ProcessPoolExecutor(len(trees), mp_context=context, initializer=_take_tree,
                             initargs=(queue,)) as pool:
        for n, outcome in enumerate(pool.map(judge, jobs), start=1):
            outcomes.append(outcome)
            if outcome.state != "not run":
                print(f"[{n}/{len(sample)}] {outcome.state:11} {outcome.spec.module_path}:"
                      f"{outcome.spec.start_pos[0]} {outcome.before!r} -> {outcome.after!r} "
                      f"({outcome.seconds:.0f} s)", flush=True)
    return outcomes


def selected(nodeid: str, tests: list[str]) -> bool:
    """Whether the pytest test ``nodeid`` is one of ``tests`` (files or node ids)."""
    return any(nodeid == t or nodeid.startswith(t + "::") or nodeid.startswith(t + "[")
               for t in tests)


def baseline(modules: list[Module], config: dict, tree: Path) -> dict[str, float]:
    """Run the tests of all ``modules`` once, unmutated (they must pass), and return each
    module's time limit per mutant: ``min_timeout`` seconds (a test run's start) plus
    ``timeout_factor`` times what its own tests took."""
    tests = list(dict.fromkeys(t for m in modules for t in m.tests))
    report = tree.parent / "baseline.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *tests]
    began = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    if run.returncode != 0:
        sys.exit(f"make mutants: the tests fail before any mutation; fix them first:\n"
                 f"{run.stdout[-3000:]}")
    print(f"baseline: {len(tests)} test files or tests pass in {time.monotonic() - began:.0f} s",
          flush=True)
    durations = {}
    for case in ElementTree.parse(report).iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        durations[f"{path}::{case.get('name')}"] = float(case.get("time", 0))
    timeouts = {}
    for module in modules:
        own = sum(t for nodeid, t in durations.items() if selected(nodeid, module.tests))
        timeouts[module.path] = config["min_timeout"] + config["timeout_factor"] * own
    return timeouts


def verdict(outcome: Outcome, known: list[dict]) -> str:
    """Why a survivor may stay (tools/mutants.toml [[known]]), or 'needs a test'."""
    for entry in known:
        if (entry["file"] == outcome.spec.module_path.as_posix()
                and entry["before"] == outcome.before and entry["after"] == outcome.after):
            return entry["why"]
    return "needs a test"


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage to one decimal ("—" of nothing)."""
    return f"{100 * part / whole:.1f} %" if whole else "—"


def cell(text: str) -> str:
    """Text for a Markdown table cell: code, pipes escaped."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def test_files(tests: list[str]) -> str:
    """Tests in short: each file, with the number of its tests picked when not the whole file."""
    picked: dict[str, list[str]] = {}
    for test in tests:
        picked.setdefault(test.split("::")[0], []).append(test)
    return ", ".join(name.removeprefix("tests/") + ("" if tests_of == [name] else
                                                    f" ({len(tests_of)} tests)")
                     for name, tests_of in picked.items())


def section(outcomes: list[Outcome], modules: list[Module], config: dict, population: int,
            seconds: float) -> str:
    """The dated Markdown section of one run."""
    from importlib.metadata import version

    counts = {state: sum(o.state == state for o in outcomes)
              for state in ("killed", "timeout", "survived", "incompetent", "no-test", "not run")}
    judged = counts["killed"] + counts["timeout"] + counts["survived"]
    killed = counts["killed"] + counts["timeout"]
    survivors = [o for o in outcomes if o.state == "survived"]
    verdicts = [verdict(o, config.get("known", [])) for o in survivors]
    # The usual mutation score leaves out the equivalent mutants (no test can tell them from the
    # code); both figures are given, and each equivalent survivor is listed with its reason.
    equivalent = sum(v.startswith("equivalent") for v in verdicts)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%d %B %Y, %H:%M UTC").lstrip("0")
    lines = [f"### {when} — Cosmic Ray {version('cosmic-ray')}, {killed}/{judged} killed "
             f"({percent(killed, judged)}); {percent(killed, judged - equivalent)} of the "
             f"{judged - equivalent} not equivalent",
             "",
             f"Sample: {len(outcomes)} of the {population} mutants of the configured functions "
             f"(seed {config['seed']}); {counts['killed']} killed by a failing test, "
             f"{counts['timeout']} by the time limit, {counts['survived']} survived; not counted: "
             f"{counts['incompetent']} incompetent (the module broke), {counts['no-test']} not "
             f"applicable, {counts['not run']} not run (time budget). Run time "
             f"{seconds / 60:.1f} min. Of the survivors, {equivalent} "
             f"{'was' if equivalent == 1 else 'were'} judged equivalent when "
             f"the run began (tools/mutants.toml, reasons below): without them the score is "
             f"{killed}/{judged - equivalent} ({percent(killed, judged - equivalent)}).", "",
             "| module | functions | tests | killed/judged |", "|---|---|---|---|"]
    for module in modules:
        mine = [o for o in outcomes if o.module.path == module.path]
        judged_m = sum(o.state in ("killed", "timeout", "survived") for o in mine)
        killed_m = sum(o.state in ("killed", "timeout") for o in mine)
        lines.append(f"| {module.path} | {', '.join(module.only) or 'all'}"
                     f"{' less ' + ', '.join(module.skip) if module.skip else ''} | "
                     f"{test_files(module.tests)} | {killed_m}/{judged_m} |")
    lines += ["", "Survivors:" if survivors else "No survivor.", ""]
    if survivors:
        lines += ["| where | change | verdict |", "|---|---|---|"]
        for o, why in zip(survivors, verdicts):
            lines.append(f"| {o.spec.module_path}:{o.spec.start_pos[0]} | {cell(o.before)} → "
                         f"{cell(o.after)} | {why} |")
    return "\n".join(lines) + "\n"


def insert_section(results: Path, text: str) -> None:
    """Put ``text`` at the top of the "Mutation testing" part of the results file (added at its
    end the first time), atomically."""
    current = results.read_text() if results.exists() else "# Benchmark results\n"
    if MARKER not in current:
        current = current.rstrip("\n") + "\n\n" + INTRO
    head, tail = current.split(MARKER, 1)
    rest = "\n" + tail.lstrip("\n") if tail.strip() else ""
    write_text(results, head + MARKER + "\n\n" + text + rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="modules, tests, sample, verdicts")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    parser.add_argument("--sample", type=int, help="mutants drawn (default: the config's)")
    parser.add_argument("--seed", type=int,
                        help="seed of the draw (default: the config's; with the same seed a "
                             "smaller sample is the start of a larger one)")
    parser.add_argument("--only", nargs="+", help="mutate only these module paths")
    parser.add_argument("--workers", type=int,
                        help="mutants judged side by side, each in its own copy of the project "
                             "(default: the config's, at most the number of cores)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    config = read_config(args.config)
    if args.seed is not None:
        config["seed"] = args.seed
    modules = [m for m in config["module"] if not args.only or m.path in args.only]
    tree = ROOT / "data" / "mutants" / "tree"
    began = time.monotonic()
    copy_tree(tree)
    os.chdir(tree)
    population = all_mutants(modules, config.get("skip_operators", []))
    size = min(args.sample or config["sample"], len(population))
    # Judged in the drawn order: if the time budget runs out, those judged are still a random
    # sample of all the modules.
    sample = random.Random(config["seed"]).sample(population, size)
    used = [m for m in modules if any(module is m for _, module in sample)]
    print(f"{len(population)} mutants in {len(modules)} modules; {size} drawn (seed "
          f"{config['seed']})", flush=True)
    timeouts = baseline(used, config, tree)
    workers = max(1, min(args.workers or config.get("workers", 1), os.cpu_count() or 1))
    trees = [tree] + [tree.with_name(f"tree{i}") for i in range(1, workers)]
    for extra in trees[1:]:
        if extra.exists():
            shutil.rmtree(extra)
        shutil.copytree(tree, extra, symlinks=True)
    budget = config["budget_minutes"] * 60 - (time.monotonic() - began)
    outcomes = run_sample(sample, trees, timeouts, budget)
    text = section(outcomes, used, config, len(population), time.monotonic() - began)
    print("\n" + text)
    if not args.no_write:
        insert_section(args.results, text)
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
