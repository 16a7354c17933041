"""The opening every stage shares (common/cli.py): the OMP_WAIT_POLICY default in place before
torch loads its OpenMP runtime, and ``start_stage`` parsing, logging and the allocator setting."""
import logging
import os
import subprocess
import sys

import pytest

from common import cli
from conftest import ROOT

STAGES = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*.py"))

# Imports one stage script as a module, as `python NN_x.py` does before main() runs, and prints the
# OMP_WAIT_POLICY seen at the moment something first imports torch ("-" when nothing does), then
# stops at once (the stage's own imports need not finish once that moment is past).
WATCH = """
import importlib.abc, importlib.util, os, sys
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Watch())
spec = importlib.util.spec_from_file_location("stage", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["stage"] = module
spec.loader.exec_module(module)
print("-", os.environ.get("OMP_WAIT_POLICY"))
"""


def test_the_stages_are_found():
    """The parametrised check below covers every stage script, not an empty list."""
    assert "01_extract.py" in STAGES and len(STAGES) >= 13


@pytest.mark.parametrize("script", STAGES)
def test_wait_policy_is_set_before_torch_loads(script):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: a stage run by hand (no Makefile
    export) must have the default in the environment by then, or it never takes effect."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", WATCH, str(ROOT / script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first = out.stdout.split()
    # torch imported at the top (01, 02): the default was there already; imported later, in a
    # function: the default is there for it when main() runs.
    assert first in (["PASSIVE"], ["-", "PASSIVE"]), (script, out.stdout)


def test_wait_policy_keeps_the_users_setting():
    """A value the user exported wins over the default."""
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE")
    out = subprocess.run([sys.executable, "-c", WATCH, str(ROOT / "01_extract.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ACTIVE"], out.stderr


def test_start_stage_parses_logs_and_keeps_memory(monkeypatch):
    """``start_stage`` returns the flags, logs at DEBUG only with -v/--verbose, and asks for the
    allocator setting only with ``keep_memory``."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    parser = cli.stage_parser("a stage")
    parser.add_argument("--n", type=int, default=3)
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        args = cli.start_stage(parser, ["--n", "5"])
        assert args.n == 5 and not args.verbose
        assert root.level == logging.INFO and calls == []
        args = cli.start_stage(parser, ["-v"], keep_memory=True)
        assert args.verbose and root.level == logging.DEBUG and calls == [1]
        assert cli.start_stage(parser, ["--verbose"]).verbose
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_settings_become_flags_and_model_again_reaches_reload_model_by_name():
    """A Settings dataclass (here one that inherits ModelAgain) becomes one flag per field with
    its default and help; the re-load settings come back as reload_model's keyword arguments,
    each under its own name."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Settings(cli.ModelAgain):
        top: int = cli.setting(20, "neurons shown", make="TOP")
        kind: str = cli.setting("fused", "which vectors", choices=("fused", "text"))

    parser = cli.stage_parser("a stage")
    cli.add_settings(parser, Settings)
    default = cli.settings_from(Settings, parser.parse_args([]))
    assert default == Settings() and default.model_again() == {
        "model": None, "weights": None, "unsafe_pickle": False}
    given = cli.settings_from(Settings, parser.parse_args(
        ["--model", "net.py:build", "--weights", "w.pt", "--unsafe-pickle", "--top", "3",
         "--kind", "text"]))
    assert given.model_again() == {"model": "net.py:build", "weights": "w.pt",
                                   "unsafe_pickle": True}
    assert (given.top, given.kind) == (3, "text")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "image"])
    assert "the model 01 ran" in parser.format_help() and "neurons shown" in parser.format_help()
    # A comma-separated setting (--layers) gives its stripped, non-empty items, in order.
    assert cli.comma_list(" relu1, ,conv2 ,") == ["relu1", "conv2"] and cli.comma_list("") == []


def test_a_stage_run_as_a_program_freezes_its_objects_before_exit():
    """exit_on_stage_error freezes the objects alive when the stage is the program and its work
    is done (Python's last garbage collection then skips them: 09's exit went from 1.5 s to 0.2 s),
    and never when main() is called by other code, such as these tests."""
    import gc

    def main(argv=None):
        """A stage's main."""
        return 7
    before = gc.get_freeze_count()
    assert cli.exit_on_stage_error(main)() == 7
    assert gc.get_freeze_count() == before
    main.__module__ = "__main__"
    try:
        assert cli.exit_on_stage_error(main)() == 7
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def contract_names() -> set[str]:
    """The file names of the artefact contract, as common.artefacts's folders list them."""
    from common import artefacts
    names = set()
    for folder in (artefacts.Run, artefacts.PairFolder, artefacts.Comparison,
                   artefacts.DescribedMosaics):
        for place in vars(folder).values():
            if isinstance(place, artefacts._InRun) and "." in place.name:
                names.add(place.name.rsplit("/", 1)[-1])
    return names


def literal_contract_paths(script) -> list[tuple[int, str]]:
    """String constants of ``script`` that are a contract file's whole name (its docstring and help
    texts name files among other words, and those are not paths)."""
    import ast
    names, tree = contract_names(), ast.parse(script.read_text())
    helps = {id(node) for call in ast.walk(tree)
             if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "add_run"
             for node in ast.walk(call)}  # add_run's texts say what a stage reads and writes
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.rsplit("/", 1)[-1] in names and id(node) not in helps]


def test_no_stage_builds_a_contract_path_from_a_literal(tmp_path):
    """Every path of a contract file comes from common.artefacts (Run and its folders)."""
    assert {"01_images.csv", "12_matches.csv", "neurons.csv", "audit.csv"} <= contract_names()
    found = {name: hits for name in STAGES if (hits := literal_contract_paths(ROOT / name))}
    assert not found, f"contract paths built from literals (use common.artefacts.Run): {found}"
    planted = tmp_path / "99_planted.py"
    planted.write_text('from pathlib import Path\nout = Path("x") / "12_matches.csv"\n')
    assert literal_contract_paths(planted) == [(2, "12_matches.csv")]
