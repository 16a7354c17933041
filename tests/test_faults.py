"""Faults a real run meets, driven through make on the fake model: SIGKILL of every stage at four
moments, killed and dying worker processes, run names that would reach outside the run folder,
a file-size limit, a stale lock holder, and user names full of control characters.

The kills come from tests/faults/sitecustomize.py (see its docstring), which every Python
process started by make imports when that folder is on PYTHONPATH.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.artefacts import Run
from common.io import read_csv
from common.provenance import read_meta
from conftest import ROOT, make_image, project_copy
from test_make import FAST, make

# Class folders, a class file and an image name holding control characters (ESC, CR, a newline,
# a right-to-left override): none may reach a log or report as such.
CLASSES = ["red\x1b[31m", "edgy\u202e", "neither"]
HOSTILE_FILE = "zz\x1b[2J\r\nage.png"  # a copy of red_00.png, listed after it: the duplicate
RAW = re.compile("[\x1b\r\u202e]")
# Three layers (4 + 4 + 2 neurons): 10 makes at least 8 thumbnails, so it forks its pool (10_atlas's
# POOL_FROM) and the worker faults below reach it.
ARGS = ["RUN=t", "MODEL=tests/fake_model.py:build", "LAYERS=relu1,pool,conv2", "INPUT_SIZE=32",
        "TOPK=9", "GRID=3", "TILE=8", "BATCH=8", "DEVICE=cpu", "WORKERS=2", "PRUNE=1",
        "CONTROLS=1", "PRUNE_IMAGES=3", "OTHER=t",  # 11 on 4 and 2 channels: μ + 3σ is out of
        "REPEATS=1", "BASKET_ALPHA=0.5", "BASKET_BETA=0.6"]  # reach, so the finch baskets need less
GOALS = ["all", "baskets", "audit", "compare"]
# Each stage (or one command of it) and the goal that runs it, in run order.
STAGES = [("01_extract.py", "all"), ("02_mosaics.py", "all"), ("03_describe.py", "all"),
          ("04_embed.py", "all"), ("05_cluster.py", "all"), ("06_trace.py", "all"),
          ("09_score.py", "all"), ("08_debug.py", "all"), ("10_atlas.py", "all"),
          ("11_baskets.py", "baskets"), ("13_audit.py relevance", "audit"),
          ("13_audit.py audit", "audit"), ("12_compare.py", "compare")]
METAS = {"13_audit.py relevance": "13_relevance.meta.json",
         "13_audit.py audit": "13_audit/13_audit.meta.json",
         "12_compare.py": "12_compare__t/12_compare.meta.json"}
# Stages that fork workers (02, 09, 10: pools; 09 and 11: the 03 they start on their mosaics),
# latest first, so that each fault re-runs as few stages before it as it can.
FORKING = [("11_baskets.py", "baskets"), ("10_atlas.py", "all"), ("09_score.py", "all"),
           ("02_mosaics.py", "all")]
# Files that differ between two clean runs: logs and the atlas's build date.
UNSTABLE = re.compile(r"\.log$|^10_atlas\.meta\.json$|^atlas/index\.html$|\.lock$")
TEMPORARY = re.compile(r"\.tmp-|^\.atlas\.")


@pytest.fixture
def hostile(tmp_path):
    """A project copy, a labelled image folder whose class folders and one file name hold control
    characters, a class file and a concepts file naming them, and make's arguments."""
    root = project_copy(tmp_path / "tree")
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for name, kind in zip(CLASSES, ["red", "edges", "plain"]):
        (images / name).mkdir(parents=True)
        for i in range(10):
            make_image(kind, 48, rng).save(images / name / f"{kind}_{i:02d}.png")
    shutil.copy(images / CLASSES[0] / "red_00.png", images / CLASSES[0] / HOSTILE_FILE)
    (images / CLASSES[2] / "broken.jpg").write_bytes(b"this is not a jpeg")
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{name}\n" for name in CLASSES))
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text('classes:\n  "red\\e[31m":\n    valid: ["red\\e[2J"]\n'
                        '    spurious: [edges]\n')
    data = tmp_path / "data"
    return root, [f"IMAGES={images}", f"DATA={data}", f"CLASSES={classes}",
                  f"AUDIT={concepts}", *ARGS], data / "t"


def session_processes(session: int) -> list[str]:
    """The live (not zombie) processes of ``session``, as "pid command"."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        state, _ppid, _pgrp, sid = stat.rsplit(")", 1)[1].split()[:4]
        if int(sid) == session and state != "Z":
            found.append(f"{name} {command.decode(errors='replace')[:120]}")
    return found


def assert_no_process_left(result, within_s=10.0):
    """Every process make started (stages, their workers) is gone within ``within_s``."""
    deadline = time.monotonic() + within_s
    while session_processes(result.session):
        assert time.monotonic() < deadline, session_processes(result.session)
        time.sleep(0.1)


def digests(run: Path) -> dict[str, str]:
    """SHA-256 of every stable file of the run folder (UNSTABLE ones left out)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))
            if p.is_file() and not UNSTABLE.search(str(p.relative_to(run)))}


def assert_controls_escaped(result, run: Path) -> None:
    """No control character of the user's names reaches make's output or any file of the run,
    but the path columns of 01's CSVs, which keep the exact bytes later stages open."""
    assert not RAW.search(result.stdout + result.stderr), \
        [line for line in (result.stdout + result.stderr).splitlines() if RAW.search(line)][:3]
    if "01_extract.py" in result.stdout:  # 01 logs the duplicate by its path, escaped
        assert "red\\x1b[31m/zz\\x1b[2J\\r\\nage.png: duplicate of image" in result.stderr
    for path in run.rglob("*"):
        if not path.is_file() or path.suffix not in (".csv", ".md", ".html", ".json", ".txt",
                                                     ".log", ".js", ".svg", ".jsonl"):
            continue
        if path.name in ("01_images.csv", "01_predictions.csv"):
            rows = read_csv(path)
            if path.name == "01_images.csv":  # kept byte for byte
                assert HOSTILE_FILE in {Path(r["path"]).name for r in rows}
            labels = {r["label"] for r in rows} - {""}
            assert labels == {"red\\x1b[31m", "edgy\\u202e", "neither"}, labels
            assert not any(RAW.search(v) for r in rows for k, v in r.items() if k != "path")
        else:
            text = path.read_text(errors="replace")
            assert not RAW.search(text), (path, RAW.search(text))


def test_kills_at_four_moments_and_dead_workers_leave_a_run_that_finishes(hostile):
    """Every stage is killed (SIGKILL) as it starts, between a temporary's write and its rename,
    midway through its writes and between its outputs and its meta; every stage that forks has its
    parent killed while the workers run, and loses one worker. After each: no process is left,
    `make -q` is false, and a dead worker fails its stage at once with a clear line. Then one
    `make` of each goal finishes, with every output byte for byte that of a clean run, and no
    temporary left, in the run folder or in the stages' TMPDIR. The clean run also shows user
    names with control characters escaped."""
    root, args, run = hostile
    counts = run.parent / "replaces.txt"
    system_tmp = run.parent / "system_tmp"  # the stages' TMPDIR: a killed one leaves nothing there
    system_tmp.mkdir(parents=True)
    base_env = {**os.environ, "PYTHONPATH": str(root / "tests" / "faults"),
                "TMPDIR": str(system_tmp)}
    for goal in GOALS:  # a clean run: its outputs, and how many files each stage moves in place
        clean = make(root, args, goal, env={**base_env, "ATLAS_FAULT_COUNT": str(counts)})
        assert clean.returncode == 0, clean.stderr[-3000:]
        assert_controls_escaped(clean, run)
        assert_no_process_left(clean)
    reference = digests(run)
    assert any(name.startswith("08_debug/") for name in reference)  # the hostile classes debugged
    writes = {}
    for line in counts.read_text().splitlines():
        command, count = line.split("\t")
        writes.setdefault(command, int(count))
    shutil.rmtree(run)

    for script, goal in STAGES:
        meta = run / METAS.get(script, script.replace(".py", ".meta.json"))
        middle = writes[script] // 2
        moments = ["start", "replace=1"] + ([f"replace={middle}"] if middle > 1 else []) + ["meta"]
        for moment in moments:
            who = "stage" if moment == "replace=1" else "all"  # make survives, or dies too
            result = make(root, args, goal, env={**base_env, "ATLAS_FAULT": f"{script}:{moment}",
                                                 "ATLAS_FAULT_WHO": who})
            where = f"{script}:{moment}"
            assert result.returncode != 0, f"{where} was not reached"
            assert script.split()[0] in result.stdout, where
            assert_no_process_left(result)
            assert make(root, args, "-q", goal).returncode != 0, where
            assert not meta.exists(), where
        if goal == "all":  # the next stage starts from this one's finished outputs
            assert make(root, args, str(meta), env=base_env).returncode == 0

    for script, goal in FORKING:
        (run / script.replace(".py", ".meta.json")).unlink(missing_ok=True)  # runs again
        killed = make(root, args, goal, env={**base_env, "ATLAS_FAULT": f"{script}:worker",
                                             "ATLAS_FAULT_WHO": "stage"})
        assert killed.returncode != 0 and script in killed.stdout, (script, killed.stderr[-2000:])
        assert re.search(r"Error 137|Killed", killed.stderr), (script, killed.stderr[-2000:])
        assert_no_process_left(killed, within_s=5)
        clock = time.monotonic()
        lost = make(root, args, goal, env={**base_env, "ATLAS_FAULT": f"{script}:worker-dies",
                                           "ATLAS_FAULT_MARK": str(run.parent / f"{script}.x")},
                    timeout=120)
        assert time.monotonic() - clock < 60, script
        assert lost.returncode != 0, script
        assert re.search(r"a worker process died|describing the mosaics of \S+ failed", lost.stderr), \
            (script, lost.stderr[-2000:])
        assert "Traceback" not in lost.stderr, (script, lost.stderr[-3000:])
        assert_no_process_left(lost, within_s=5)

    for goal in GOALS:
        final = make(root, args, goal, env=base_env)
        assert final.returncode == 0, final.stderr[-3000:]
        assert_no_process_left(final)
    assert make(root, args, "-q", "all").returncode == 0
    assert digests(run) == reference
    assert [str(p) for p in run.rglob("*") if TEMPORARY.search(p.name)] == []
    # torch keeps its compiler's cache there on purpose (torchinductor_<user>)
    assert [p.name for p in system_tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    for path in ("01_activations.npz", "08_confusion.csv", "09_scores.csv", "11_baskets.csv",
                 "12_compare__t/12_matches.csv", "13_relevance.npz"):
        read_meta(run / path)  # every output matches the meta written with it
    read_meta(run / "13_audit" / "summary.csv", run / METAS["13_audit.py audit"])


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", "-x", "a b",
                                  "$(shell touch pwned)"])
def test_run_names_that_leave_the_data_folder_are_refused(tmp_path, name):
    """`make clean` (and any goal) with RUN or OTHER not a plain name stops at once with one line
    and removes nothing: every file of the project copy and beside the data folder is still there."""
    root = project_copy(tmp_path / "tree")
    data = tmp_path / "tree" / "data"
    (data / "demo").mkdir(parents=True)
    (data / "demo" / "01_activations.npz").write_text("a run's output")
    (data / "01_keep.csv").write_text("not in any run")
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for variable, goal in (("RUN", "clean"), ("RUN", "all"), ("OTHER", "compare")):
        if variable == "OTHER" and not name:
            continue  # no OTHER: `make compare` asks for one (tests/test_make.py)
        result = make(root, [f"{variable}={name}"], goal, timeout=120)
        assert result.returncode != 0, (variable, name)
        assert f"{variable}={name} is not a plain name" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == "", result.stdout
        assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before, (variable, name)
    assert not (tmp_path / "tree" / "pwned").exists()


def test_make_clean_removes_the_outputs_of_its_run_only(tmp_path):
    """`make clean` with a plain RUN removes that run's outputs and keeps its descriptions, and
    nothing of another run beside it; a DATA with a blank is refused."""
    root = project_copy(tmp_path / "tree")
    data = tmp_path / "data"
    for run in ("a", "b"):
        for name in ("01_activations.npz", "03_descriptions.csv", "09_subconcepts/03_x.csv",
                     "09_subconcepts/d/1.png", "atlas/index.html", ".args/01"):
            (data / run / name).parent.mkdir(parents=True, exist_ok=True)
            (data / run / name).write_text(name)
    result = make(root, ["RUN=a", f"DATA={data}"], "clean", timeout=120)
    assert result.returncode == 0, result.stderr
    left = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}
    assert {"a/03_descriptions.csv", "a/09_subconcepts/03_x.csv"} <= left
    assert not {"a/01_activations.npz", "a/09_subconcepts/d/1.png", "a/atlas/index.html",
                "a/.args/01"} & left
    assert {f"b/{n}" for n in ("01_activations.npz", "atlas/index.html", ".args/01")} <= left
    blank = make(root, [f"DATA={data} x"], "clean", timeout=120)
    assert blank.returncode != 0 and "must name one folder" in blank.stderr


def test_a_lock_kept_by_a_dead_stages_child_names_the_live_child(tmp_path):
    """A stage's forked children share its run lock. Should one outlive the stage, `make` stops
    and names that live child (its pid and command), not the dead stage that took the lock."""
    root = project_copy(tmp_path / "tree")
    data = tmp_path / "data"
    script = tmp_path / "stage.py"
    script.write_text("import os, sys, time\n"
                      "child = os.fork()\n"
                      "if child:\n    print(child, flush=True)\n    time.sleep(60)\n"
                      "else:\n    sys.stdout.close()\n    time.sleep(60)\n")
    stage = subprocess.Popen([sys.executable, "-m", "tools.runlock", "stage", str(data / "t"),
                              "--", sys.executable, str(script)], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    child = int(stage.stdout.readline())
    try:
        stage.kill()
        stage.wait()
        result = make(root, [f"DATA={data}", *FAST], "all", timeout=120)
        assert result.returncode != 0 and "still writing" in result.stderr
        assert f"({child} {sys.executable} {script})" in result.stderr, result.stderr
        assert str(stage.pid) not in result.stderr
    finally:
        os.kill(child, 9)


def test_a_file_size_limit_is_one_line_naming_the_path_and_the_fix(image_folder, tmp_path):
    """02 under `ulimit -f` (its image cache is larger than the limit) stops with one line that
    names the folder and `ulimit -f`, exit status 2, no traceback."""
    import resource
    from conftest import FAKE_MODEL, load_stage
    out = tmp_path / "run"
    load_stage("01_extract").main(["--images", str(image_folder), "--run", str(out), "--model",
                                   FAKE_MODEL, "--layers", "relu1", "--input-size", "32",
                                   "--topk", "9", "--batch-size", "8", "--device", "cpu"])
    limit = 16 << 10  # the cache of 30 decoded 32-px images needs about 90 kB

    def small_files():
        """In the child: files may not grow past ``limit``."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = subprocess.run([sys.executable, str(ROOT / "02_mosaics.py"), "--run", str(out),
                             "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            preexec_fn=small_files)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    assert len(error) == 1, result.stderr
    assert f"cannot write {out / '02_mosaics'}" in error[0]
    assert "`ulimit -f`, is 0.0 MB" in error[0] and "ulimit -f unlimited" in error[0]


def test_disk_checks_state_the_whole_requirement(image_folder, tmp_path, monkeypatch, caplog):
    """02's check of free space counts the space it keeps for the mosaics in the figure it
    gives: "needs 1.1 GB free … 0.0 GB of scratch … 1.1 GB kept for the mosaics"."""
    import collections
    from common.cli import StageError
    from conftest import FAKE_MODEL, load_stage
    out = tmp_path / "run"
    load_stage("01_extract").main(["--images", str(image_folder), "--run", str(out), "--model",
                                   FAKE_MODEL, "--layers", "relu1", "--input-size", "32",
                                   "--topk", "9", "--batch-size", "8", "--device", "cpu"])
    mosaics = load_stage("02_mosaics")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(mosaics.shutil, "disk_usage", lambda _: usage(1 << 40, 0, 100 << 20))
    with pytest.raises(StageError) as err:
        mosaics.run(Run(out), mosaics.Settings(grid=3, tile=8))
    assert re.search(r"needs 1\.1 GB free .* 0\.0 GB of scratch space .* 1\.1 GB kept for the "
                     r"mosaics — and 0\.1 GB are free", str(err.value)), str(err.value)


@pytest.mark.parametrize("number, words", [
    ("EACCES", "permission denied"), ("EPERM", "permission denied"),
    ("EROFS", "read-only file system"), ("EFBIG", "larger than allowed"),
    ("ENOSPC", "disk full"), ("EDQUOT", "disk full")])
def test_write_errors_a_user_must_fix_become_one_line_naming_the_file(tmp_path, number, words):
    """Inside ``disk_guard`` (every atomic write), an OSError of the file system becomes a
    StageError naming the final file — not the temporary — and the fix; another OSError stays."""
    import errno
    from common.cli import StageError
    from common.io import atomic_path
    target = tmp_path / "out" / "09_scores.csv"
    with pytest.raises(StageError) as err:
        with atomic_path(target) as tmp:
            raise OSError(getattr(errno, number), os.strerror(getattr(errno, number)), str(tmp))
    message = str(err.value)
    assert words in message and "\n" not in message
    assert str(tmp_path / "out") in message and ".tmp-" not in message
    assert "run again" in message and "finished work is kept" in message
    with pytest.raises(OSError):
        with atomic_path(target):
            raise OSError(errno.EIO, "input/output error")


def test_escaped_shows_control_characters_and_logs_use_it(capfd):
    """``escaped`` writes ESC, CR, a newline, a tab and a bidi override as visible escapes and
    leaves other text (accents, spaces) alone; a stage's log escapes names, paths and the
    messages of errors it shows, and keeps its own line breaks between records."""
    import logging
    from common.cli import escaped, setup_logging
    assert escaped("a\x1b[2Jb\r\nc\td\u202ee é") == "a\\x1b[2Jb\\r\\nc\\td\\u202ee é"
    assert escaped("plain name") == "plain name" and escaped(Path("x\x07")) == "x\\x07"
    setup_logging()
    log = logging.getLogger("neuron-atlas.test")
    log.warning("image %s skipped (%s), %d left", Path("a\x1b[31m.png"),
                ValueError("cannot read b\r\n.png"), 3)
    err = capfd.readouterr().err
    assert "image a\\x1b[31m.png skipped (cannot read b\\r\\n.png), 3 left" in err
    assert "\x1b" not in err and "\r" not in err and err.count("\n") == 1
