"""The Makefile drives the real scripts on the fake model: a full run, `make -q`, and partial re-runs.

The repository's scripts are copied (with their timestamps) into a scratch tree so that touching a
script in the test never touches the working copy.
"""
import collections
import json
import modulefinder
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tools import deps
from common.artefacts import read_confusion
from common.io import read_csv
from conftest import ROOT, make_image, project_copy

FAST = ["RUN=t", "MODEL=tests/fake_model.py:build", "LAYERS=relu1,conv2", "INPUT_SIZE=32",
        "TOPK=9", "GRID=3", "TILE=8", "BATCH=8", "DEVICE=cpu", "WORKERS=1"]


@pytest.fixture
def tree(tmp_path, image_folder):
    """A copy of the project (sharing .venv) in which make can run and scripts can be touched."""
    root = project_copy(tmp_path / "tree")
    return root, [f"IMAGES={image_folder}", f"DATA={tmp_path / 'data'}", *FAST]


def make(root, args, *extra, env=None, timeout=600):
    """Run make in ``root`` in a session (and process group) of its own, so that a fault can kill
    make and its stages together; return the completed process, with ``session``: its id, the
    session every process it starts belongs to."""
    proc = subprocess.Popen(["make", "--no-print-directory", *extra, *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    out, err = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.session = proc.pid
    return done


def run_folder(args):
    """The run folder data/t of ``args``."""
    return Path(next(a for a in args if a.startswith("DATA=")).split("=", 1)[1]) / "t"


def commands(result):
    """Which stage scripts a (dry) run would execute."""
    return sorted({word for word in result.stdout.split() if word[:2].isdigit()
                   and word.endswith(".py")})


def module_users() -> dict[str, set[str]]:
    """common/*.py → the stage scripts that import it (tools/deps.py's answer)."""
    users = collections.defaultdict(set)
    for script in ROOT.glob("[0-9][0-9]_*.py"):
        for name in deps.common_files(script):
            users[name].add(script.name)
    return {name: users[name] for name in users if name.endswith(".py")}


def test_make_all_then_up_to_date_then_partial(tree):
    """`make all` builds everything, `make -q all` is then true, and touching 02 re-runs only 02+."""
    root, args = tree
    first = make(root, args, "all")
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"01_extract.py", "02_mosaics.py", "03_describe.py", "04_embed.py", "05_cluster.py",
            "06_trace.py", "08_debug.py", "09_score.py"} <= set(commands(first))
    data = next(a for a in args if a.startswith("DATA=")).split("=", 1)[1]
    for name in ("01_activations.npz", "02_mosaics.csv", "03_descriptions.csv",
                 "04_embeddings.npz", "04_crops.npz", "05_metrics.csv", "06_sankey.html",
                 "08_confusion.csv", "09_scores.csv", "09_summary.csv", "09_eval.csv"):
        assert os.path.exists(os.path.join(data, "t", name)), name
    assert make(root, args, "-q", "all").returncode == 0

    time.sleep(1.1)  # make compares timestamps at one-second granularity on some file systems
    os.utime(root / "02_mosaics.py")
    dry = make(root, args, "-n", "all")
    assert "02_mosaics.py" in commands(dry) and "01_extract.py" not in commands(dry)

    # A module that of `all`'s stages only 09 imports (14, on request, may share it) re-runs 09
    # (and what reads its scores), nothing before it.
    make(root, args, "all")
    only_09 = [m for m, users in module_users().items()
               if "09_score.py" in users and users <= {"09_score.py", "14_describers.py"}]
    assert only_09, "no common module is imported by 09 alone: pick another late-stage module"
    time.sleep(1.1)
    os.utime(root / only_09[0])
    dry = make(root, args, "-n", "all")
    assert "09_score.py" in commands(dry), only_09[0]
    # 08 reads nothing of 09 (the atlas joins them), so it does not wait for 09 either.
    assert not {"01_extract.py", "02_mosaics.py", "03_describe.py", "04_embed.py", "05_cluster.py",
                "06_trace.py", "08_debug.py"} & set(commands(dry)), only_09[0]

    # A changed variable re-runs the stages it affects: a new grid touches 02, not 01.
    make(root, args, "all")
    dry = make(root, [a if not a.startswith("GRID=") else "GRID=2" for a in args], "-n", "all")
    assert "02_mosaics.py" in commands(dry) and "01_extract.py" not in commands(dry)
    # ... and a dry run stores nothing: with the old variables everything is still up to date.
    assert make(root, args, "-q", "all").returncode == 0


def test_broken_stage_leaves_no_target(tree):
    """.DELETE_ON_ERROR: a failing 01 (unknown layer) leaves no half-made target behind."""
    root, args = tree
    result = make(root, [a if not a.startswith("LAYERS=") else "LAYERS=nope" for a in args], "all")
    assert result.returncode != 0
    assert "not a module of the model" in result.stderr
    data = next(a for a in args if a.startswith("DATA=")).split("=", 1)[1]
    assert not os.path.exists(os.path.join(data, "t", "01_activations.npz"))


def test_help_lists_targets_and_variables():
    """`make help` lists `all` first, then every stage's own target in run order (each with the
    number of its script), the project's commands, and every variable a user sets."""
    result = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    targets = [line.split("\t")[0] for line in result.stdout.splitlines() if "\t" in line
               and not line.startswith(" ") and "=" not in line.split("\t")[0]]
    stages = ["extract", "mosaics", "describe", "embed", "cluster", "trace", "search", "debug",
              "score", "atlas", "baskets", "compare", "audit"]
    assert targets[0] == "all"
    assert [t for t in targets if t in stages] == stages
    numbered = {line.split("\t")[0]: line.split("\t")[1][:3] for line in result.stdout.splitlines()
                if line.split("\t")[0] in stages}
    assert numbered == {name: f"{n:02d}:" for n, name in enumerate(stages, start=1)}
    assert {"test", "bench", "help", "clean", "venv"} <= set(targets)
    helps = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    assert helps["describe-compare"].startswith("14:")  # a hyphenated target is listed too
    variables = {line.split(" = ")[0] for line in result.stdout.splitlines() if " = " in line}
    assert {"RUN", "IMAGES", "MODEL", "LAYERS", "TOPK", "DESCRIBER", "AUDIT", "DATA"} <= variables


def makefile_defaults() -> dict[str, str]:
    """``VAR ?= value#  comment`` lines of the Makefile: variable → its default, as written."""
    found = re.findall(r"^([A-Z][A-Z0-9_]*)\s*\?=[ \t]*([^#\n]*?)[ \t]*#", 
                       (ROOT / "Makefile").read_text(), re.M)
    return dict(found)


def same_default(text: str, value) -> bool:
    """Whether the Makefile's ``text`` sets what the Python default ``value`` is."""
    if isinstance(value, bool):
        return text == ("1" if value else "0")
    if value is None:
        return text == ""
    if isinstance(value, (int, float)):
        return text != "" and float(text) == value
    return text == str(value)


def test_each_setting_has_its_default_once_and_make_passes_it():
    """Every field of a stage's Settings that a Makefile variable sets (``make`` in its metadata)
    has the Makefile default equal to the Python one, and the stage's ARGS_NN hands the variable
    to that field's flag: a default changed in one place only is caught here."""
    import dataclasses
    from conftest import load_stage
    defaults = makefile_defaults()
    makefile = (ROOT / "Makefile").read_text()
    shared = {m.group(1): m.group(2) for m in re.finditer(r"^([A-Z_]+) :=(.*?)\n(?=\S)", makefile,
                                                          re.M | re.S)
              if not m.group(1).startswith("ARGS_")}
    checked = []
    for script in sorted(ROOT.glob("[01][0-9]_*.py")):
        settings = getattr(load_stage(script.stem), "Settings", None)
        if settings is None:
            continue
        block = re.search(rf"^ARGS_{script.stem[:2]} :=(.*?)\n(?=\S)", makefile, re.M | re.S)
        if block:  # flags may come through a shared variable (GENERATE, MODEL_AGAIN): expand it
            text = block.group(1)
            for _ in range(2):
                text = re.sub(r"\$\((\w+)\)", lambda m: shared.get(m.group(1), m.group(0)), text)
            block = re.match(r"(.*)", text, re.S)
        for field in dataclasses.fields(settings):
            var = field.metadata.get("make")
            if not var:
                continue
            assert var in defaults, f"{script.name}: {field.name} names no variable {var}"
            assert same_default(defaults[var], field.default), \
                f"{var} ?= {defaults[var]!r} but {script.name}'s {field.name} = {field.default!r}"
            flag = "--" + field.name.replace("_", "-")
            passed = rf"{flag}\b[^-]*?\$\({var}\)|\$\({var}\)\),{flag}\b"
            assert block and re.search(passed, block.group(1)), \
                f"ARGS_{script.stem[:2]} lacks {flag} $({var})"
            checked.append((script.stem, field.name))
    assert len({stage for stage, _ in checked}) >= 2 and len(checked) >= 10, checked


GREY = ["RUN=g", "MODEL=tests/fake_grey_model.py:build", "LAYERS=relu1,bands", "INPUT_SIZE=32",
        "MEAN=0.2", "STD=0.25", "TOPK=8", "GRID=2", "TILE=8", "BATCH=8", "DEVICE=cpu", "WORKERS=1",
        "MIN_ERRORS=3", "ABLATE_TOP=2"]
ALL_STAGES = ["01_extract.py", "02_mosaics.py", "03_describe.py", "04_embed.py", "05_cluster.py",
              "06_trace.py", "08_debug.py", "09_score.py", "10_atlas.py"]


@pytest.fixture
def grey_tree(tree, stripe_folder):
    """The project tree and the make arguments of the grey 4-class model on the stripe folder."""
    root, args = tree
    data = next(a for a in args if a.startswith("DATA="))
    classes = stripe_folder.parent / "classes.txt"
    return root, [f"IMAGES={stripe_folder}", data, f"CLASSES={classes}", *GREY], \
        stripe_folder, classes, Path(data.split("=", 1)[1]) / "g"


def test_own_grey_model_with_its_own_classes(grey_tree):
    """A 1-channel model with its own class names, MEAN/STD and a class file: the names reach the
    predictions, 08's table and report, and 03's deep sentences; the accuracy is recorded."""
    root, args, images, classes, run = grey_tree
    result = make(root, args, "all")
    assert result.returncode == 0, result.stderr[-3000:]
    preds = read_csv(run / "01_predictions.csv")
    assert {r["pred_name"] for r in preds} == {"pin stripe", "narrow band", "wide band",
                                               "broad band"}
    assert all(int(r["label_idx"]) >= 0 for r in preds)  # "WIDE band" → "wide band" etc.
    meta = json.loads((run / "01_extract.meta.json").read_text())
    assert meta["preprocess"] == {"input_size": 32, "mean": [0.2], "std": [0.25], "channels": 1}
    assert meta["accuracy"]["n_correct"] == 32 and not meta["accuracy"]["warning"]
    confusion = read_confusion(run / "08_confusion.csv")
    assert confusion[0].class_ == "narrow band" and confusion[0].top1_pred == "pin stripe"
    report = (run / "08_debug" / "narrow_band__pin_stripe" / "report.md").read_text()
    assert "narrow band" in report and "pin stripe" in report
    deep = {int(r["channel"]): r["description"] for r in read_csv(run / "03_descriptions.csv")
            if r["layer"] == "bands"}
    assert "wide band" in deep[2] and "broad band" in deep[3], deep
    assert "ImageNet" not in (run / "03_descriptions.csv").read_text()
    assert make(root, args, "-q", "all").returncode == 0


def test_stale_inputs_rerun_exactly_what_they_must(grey_tree):
    """Adding or replacing an image anywhere below IMAGES, editing the model's .py file or the
    class file re-runs 01 and everything after it; touching them without change re-runs nothing."""
    root, args, images, classes, run = grey_tree
    assert make(root, args, "all").returncode == 0
    model_py = root / "tests" / "fake_grey_model.py"

    def dry():
        """The stage scripts a dry run would execute (and a check that it stored nothing)."""
        out = commands(make(root, args, "-n", "all"))
        assert commands(make(root, args, "-n", "all")) == out
        return out

    time.sleep(1.1)
    os.utime(classes)
    os.utime(model_py)
    assert dry() == []                                 # same content: nothing to do
    # (GNU make 4.3's dry run lists only the first stage of a chain of grouped targets: 01 here;
    # the real run below shows the stages after it follow.)
    shutil.copy(images / "broad_band" / "0.png", images / "broad_band" / "new.png")
    assert dry() == ["01_extract.py"]                  # an added image (a sub-folder's mtime)
    (images / "broad_band" / "new.png").unlink()
    assert dry() == []
    with open(images / "WIDE band" / "3.png", "r+b") as fh:  # replaced in place, same size
        data = fh.read()
        fh.seek(0)
        fh.write(data[:-1] + bytes([data[-1] ^ 1]))
    assert dry() == ["01_extract.py"]
    model_py.write_text(model_py.read_text() + "\n# a comment\n")
    classes.write_text("pin stripe\nnarrow band\nwide band\nBROAD\n")
    assert "01_extract.py" in dry()
    first_journal = (run / "03_descriptions.part-0-of-1.jsonl").read_text().count("\n")
    rerun = make(root, args, "all")
    assert rerun.returncode == 0 and commands(rerun) == ALL_STAGES
    deep = [r["description"] for r in read_csv(run / "03_descriptions.csv") if r["layer"] == "bands"]
    assert any("BROAD" in d for d in deep)             # described again with the new names
    journal = (run / "03_descriptions.part-0-of-1.jsonl").read_text().count("\n")
    assert journal == 2 * first_journal
    assert make(root, args, "-q", "all").returncode == 0


def test_unlabelled_odd_names_and_missing_images(tree, tmp_path):
    """A flat folder named with a space and a leading dash, holding a file whose name has a
    newline, runs `make all` to the end (08 writes a note); a missing IMAGES is a clear error."""
    root, args = tree
    rng = np.random.default_rng(0)
    folder = tmp_path / "-my photos"
    folder.mkdir()
    for i in range(12):
        make_image(["red", "edges", "plain"][i % 3], 40, rng).save(folder / f"im {i}.png")
    shutil.copy(folder / "im 0.png", folder / "line\nbreak.png")
    args = [a for a in args if not a.startswith("IMAGES=")] + [f"IMAGES={folder}"]
    result = make(root, args, "all")
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(next(a for a in args if a.startswith("DATA=")).split("=", 1)[1]) / "t"
    rows = read_csv(run / "01_images.csv")
    assert len(rows) == 13 and "line\nbreak.png" in {Path(r["path"]).name for r in rows}
    dup = next(r for r in rows if Path(r["path"]).name == "line\nbreak.png")
    assert dup["status"] == "skipped" and "same content" in dup["reason"]
    assert "Nothing to debug" in (run / "08_debug" / "note.md").read_text()
    assert make(root, args, "-q", "all").returncode == 0
    missing = make(root, [a for a in args if not a.startswith("IMAGES=")] +
                   [f"IMAGES={tmp_path / 'nope'}"], "all")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert "No rule to make target" not in missing.stderr


def test_one_writer_per_run_folder(tree, tmp_path):
    """While another make holds the run folder, or a stage of an interrupted make still runs,
    `make all` stops at once with a message and runs nothing."""
    root, args = tree
    data = run_folder(args)
    other_make = subprocess.Popen(["sleep", "60"])
    try:
        held = subprocess.run([sys.executable, "-m", "tools.runlock", "make", str(data),
                               str(other_make.pid)], cwd=root, capture_output=True, text=True)
        assert held.returncode == 0 and held.stdout.strip() == ""
        second = make(root, args, "all")
        assert second.returncode != 0
        assert f"another make ({other_make.pid} make" in second.stderr
        assert "already running" in second.stderr
        assert not (data / "01_activations.npz").exists() and not (data / ".args").exists()
    finally:
        other_make.kill()
        other_make.wait()
    orphan = subprocess.Popen([sys.executable, "-m", "tools.runlock", "stage", str(data), "--",
                               "sleep", "60"], cwd=root)
    try:
        lock, deadline = data / ".stage.lock", time.time() + 10
        while not (lock.exists() and "sleep" in lock.read_text()):  # the "stage" has started
            assert time.time() < deadline
            time.sleep(0.05)
        blocked = make(root, args, "all")
        assert blocked.returncode != 0 and "still writing" in blocked.stderr
        assert not (data / "01_activations.npz").exists()
    finally:
        orphan.kill()
        orphan.wait()
    assert make(root, args, "-n", "all").returncode == 0  # a dry run needs no lock

    # Two real makes: while the first one's 01 runs, the second stops; 01 runs once.
    slow = {**os.environ, "PYTHONPATH": str(root / "tests" / "faults"),
            "ATLAS_FAULT": "01_extract.py:pause=4"}
    first = subprocess.Popen(["make", "--no-print-directory", *args,
                              str(data / "01_extract.meta.json")],  # stage 01 only
                             cwd=root, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    lock, deadline = data / ".stage.lock", time.time() + 120
    while not (lock.exists() and "01_extract.py" in lock.read_text()):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = make(root, args, "all")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode != 0 and "already running" in second.stderr
    assert "01_extract.py" not in second.stdout
    assert out.count("01_extract.py") == 1


def test_make_baskets_audit_and_compare(tree, tmp_path):
    """After `make all`, the on-request targets of 11, 12 and 13 run through make with the run's
    own MODEL (a model file, named again), write their files, and `make baskets` then has nothing
    left to do; `make compare` of a run with itself matches every neuron to itself."""
    root, args = tree
    assert make(root, args, "all").returncode == 0
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("classes:\n  '0':\n    valid: [red]\n    spurious: [edges]\n")
    # The same variables in every call: a changed PRUNE, CONTROLS or PRUNE_IMAGES would
    # (rightly) make 11's outputs out of date.
    small = ["PRUNE=1", "CONTROLS=1", "PRUNE_IMAGES=3", "REPEATS=1", "BASKET_ALPHA=0.5",
             "BASKET_BETA=0.6"]  # 4 and 2 channels: μ + 3σ is out of reach
    for target in (["baskets"], ["audit", f"AUDIT={concepts}"], ["compare", "OTHER=t"]):
        result = make(root, args, *target, *small)
        assert result.returncode == 0, result.stderr[-2000:]
    run = run_folder(args)
    for name in ("11_baskets.csv", "11_pruning.csv", "11_baskets.meta.json", "13_relevance.npz",
                 "13_audit/summary.csv", "13_audit/0/report.html",
                 "12_compare__t/12_alignment.png"):
        assert (run / name).is_file(), name
    assert "11_baskets.py" not in commands(make(root, args, "-n", "baskets", *small))
    assert "11_baskets.py" in commands(make(root, args, "-n", "baskets", "PRUNE=2"))
    from common.io import read_csv
    matches = read_csv(run / "12_compare__t" / "12_matches.csv")
    assert matches and all(r["mutual"] == "1" for r in matches)


def make_database(*args) -> dict[str, tuple[list[str], str]]:
    """The rules of make's database (``make -p``) without running anything: file target →
    (its prerequisites before ``|``, its recipe as written)."""
    result = subprocess.run(["make", "-p", "-n", "help", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    files = result.stdout.split("\n# Files\n", 1)[1]
    rules = {}
    for block in files.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        if not lines or ":" not in lines[0] or lines[0].startswith(("\t", ".")):
            continue
        target, prerequisites = lines[0].split(":", 1)
        recipe = "\n".join(line for line in lines[1:] if line.startswith("\t"))
        rules[target] = (prerequisites.split("|")[0].lstrip("&:").split(), recipe)
    return rules


def test_each_rule_lists_exactly_the_common_files_its_scripts_use(tmp_path):
    """A rule that runs a script (a stage or tool listed among its prerequisites, or ``-m tools.x``
    in its recipe) has exactly that script's common/ files among its prerequisites: the modules it
    imports, directly or not, and the data files they read — no fewer (a stale result) and no
    more (editing a report helper must not re-run extraction)."""
    prompts = tmp_path / "prompts.yaml"  # PROMPTS is an input of its own, besides the default
    rules = make_database(f"DATA={tmp_path}", f"PROMPTS={prompts}")
    checked = set()
    for target, (prerequisites, recipe) in rules.items():
        scripts = {p for p in prerequisites if re.fullmatch(r"\d\d_\w+\.py|tools/\w+\.py", p)}
        scripts |= {f"{package}/{m}.py"
                    for package, m in re.findall(r"-m (common|tools)\.(\w+)", recipe)}
        if not scripts:
            continue
        wanted = {f for script in scripts for f in deps.common_files(Path(script))}
        assert {p for p in prerequisites if p.startswith("common/")} == wanted, target
        checked |= scripts
    assert {"tools/demo.py", "01_extract.py", "02_mosaics.py", "03_describe.py", "04_embed.py",
            "05_cluster.py", "06_trace.py", "08_debug.py", "09_score.py"} <= checked
    # Every data file of common/ reaches the rules of the scripts that read it.
    listed = {p for prerequisites, _ in rules.values() for p in prerequisites}
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data and data <= listed, data - listed


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("[0-9][0-9]_*.py")) +
                         sorted(f"common/{p.name}" for p in (ROOT / "common").glob("*.py")))
def test_deps_finds_the_modules_python_would_import(script):
    """tools/deps.py agrees with the standard library's modulefinder, which reads the compiled
    code (imports inside functions included) instead of the source lines deps.py parses."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)])
    finder.run_script(str(ROOT / script))
    found = {"common/__init__.py" if name == "common" else f"common/{name[7:]}.py"
             for name in finder.modules if name == "common" or name.startswith("common.")}
    if script.startswith("common/"):
        found |= {script, "common/__init__.py"}
    assert {f for f in deps.common_files(Path(script)) if f.endswith(".py")} == found


def test_deps_counts_the_data_files_a_module_reads():
    """A module that names a data file of common/ makes it a dependency of every script that
    imports the module, even indirectly (01 → models → imagenet → imagenet_classes.tsv)."""
    assert "common/imagenet_classes.tsv" in deps.common_files(Path("common/imagenet.py"))
    assert "common/imagenet_classes.tsv" in deps.common_files(Path("01_extract.py"))
    assert "common/imagenet_classes.tsv" not in deps.common_files(Path("common/mosaics.py"))


def test_deps_counts_templates_per_file():
    """Templates are dependencies file by file: the atlas's page templates (and the base they
    extend, found independently with jinja2's own parser) belong to 10 only, while 08, which
    renders reports, gets report.html/report.md and the stylesheet they inline — so editing an
    atlas page does not re-run 08's causal check, and editing the report template does."""
    import jinja2
    import jinja2.meta

    atlas = set(deps.common_files(Path("10_atlas.py")))
    debug = set(deps.common_files(Path("08_debug.py")))
    templates = ROOT / "common" / "templates"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates))
    for page in templates.glob("atlas_*.html"):
        assert f"common/templates/{page.name}" in atlas and \
            f"common/templates/{page.name}" not in debug, page.name
        parsed = env.parse(page.read_text(encoding="utf-8"))
        for parent in jinja2.meta.find_referenced_templates(parsed):
            assert f"common/templates/{parent}" in atlas, (page.name, parent)
    assert {"common/templates/report.html", "common/templates/report.md",
            "common/templates/atlas.css"} <= debug
    assert "common/templates/base.html" not in debug
    assert not any("templates" in f for f in deps.common_files(Path("01_extract.py")))


def test_the_mutation_config_names_functions_and_tests_that_exist():
    """tools/mutants.toml (make mutants) names, per module, functions the module defines and tests
    that exist, so that a renamed function or test cannot quietly drop out of the measurement."""
    import ast
    from tools.mutants import CONFIG, read_config
    modules = read_config(CONFIG)["module"]
    assert modules
    for module in modules:
        tree = ast.parse((ROOT / module.path).read_text())
        defined = {n.name for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert {name.split(".")[0] for name in module.only} <= defined, module.path
        for test in module.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), test
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(),
                                 re.M), test
    known = [(k["file"], k["before"], k["after"]) for k in read_config(CONFIG)["known"]]
    assert len(known) == len(set(known))  # one reason per survivor


def test_mutation_section_gives_the_score_with_and_without_equivalent_survivors(monkeypatch):
    """12 judged mutants, 9 killed (one by the time limit): 75.0 %. Of the 3 survivors one has an
    "equivalent" reason, one "not worth a test", one none: 9 of the 11 not equivalent, 81.8 %;
    each survivor is listed with its verdict, and incompetent mutants count nowhere."""
    from types import SimpleNamespace
    from tools.mutants import Module, Outcome, section
    # Cosmic Ray is a dev requirement (make mutants installs it), not in the test environment
    monkeypatch.setattr("importlib.metadata.version", lambda name: "8.7.0")
    module = Module("m.py", ["tests/test_m.py"])

    def outcome(state, line, after="x = 2"):
        spec = SimpleNamespace(module_path=Path("m.py"), start_pos=(line, 0))
        return Outcome(spec, module, state, before="x = 1", after=after)
    outcomes = ([outcome("killed", i) for i in range(8)] + [outcome("timeout", 8)]
                + [outcome("survived", 9, "x = 3"), outcome("survived", 10, "x = 4"),
                   outcome("survived", 11, "x = 5"), outcome("incompetent", 12)])
    known = [{"file": "m.py", "before": "x = 1", "after": "x = 3", "why": "equivalent: same x"},
             {"file": "m.py", "before": "x = 1", "after": "x = 4", "why": "not worth a test: rare"}]
    text = section(outcomes, [module], {"seed": 5, "known": known}, 40, 60.0)
    assert text.splitlines()[0].endswith(
        "Cosmic Ray 8.7.0, 9/12 killed (75.0 %); 81.8 % of the 11 not equivalent")
    assert "1 was judged equivalent" in text and "the score is 9/11 (81.8 %)" in text
    assert "| m.py:9 | `x = 1` → `x = 3` | equivalent: same x |" in text
    assert "| m.py:10 | `x = 1` → `x = 4` | not worth a test: rare |" in text
    assert "| m.py:11 | `x = 1` → `x = 5` | needs a test |" in text
    assert "| m.py | all | test_m.py | 9/12 |" in text
