"""The Makefile drives the real scripts on the fake model: a full run, `make -q`, and partial re-runs.

The repository's scripts are copied (with their timestamps) into a scratch tree so that touching a
script in the test never touches the working copy.
"""
import os
import subprocess
import time

import pytest

from conftest import ROOT, project_copy

FAST = ["RUN=t", "MODEL=tests/fake_model.py:build", "LAYERS=relu1,conv2", "INPUT_SIZE=32",
        "TOPK=9", "GRID=3", "TILE=8", "BATCH=8", "DEVICE=cpu", "WORKERS=1"]


@pytest.fixture
def tree(tmp_path, image_folder):
    """A copy of the project (sharing .venv) in which make can run and scripts can be touched."""
    root = project_copy(tmp_path / "tree")
    return root, [f"IMAGES={image_folder}", f"DATA={tmp_path / 'data'}", *FAST]


def make(root, args, *extra):
    """Run make in ``root``; return the completed process."""
    return subprocess.run(["make", "--no-print-directory", *extra, *args], cwd=root,
                          capture_output=True, text=True, timeout=600)


def commands(result):
    """Which stage scripts a (dry) run would execute."""
    return sorted({word for word in result.stdout.split() if word[:2].isdigit()
                   and word.endswith(".py")})


def test_make_all_then_up_to_date_then_partial(tree):
    """`make all` builds everything, `make -q all` is then true, and touching 02 re-runs only 02+."""
    root, args = tree
    first = make(root, args, "all")
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"01_extract.py", "02_mosaics.py", "03_describe.py", "04_embed.py", "05_cluster.py",
            "06_trace.py", "08_debug.py"} <= set(commands(first))
    data = next(a for a in args if a.startswith("DATA=")).split("=", 1)[1]
    for name in ("01_activations.npz", "02_mosaics.csv", "03_descriptions.csv",
                 "04_embeddings.npz", "05_metrics.csv", "06_sankey.html", "08_confusion.csv"):
        assert os.path.exists(os.path.join(data, "t", name)), name
    assert make(root, args, "-q", "all").returncode == 0

    time.sleep(1.1)  # make compares timestamps at one-second granularity on some file systems
    os.utime(root / "02_mosaics.py")
    dry = make(root, args, "-n", "all")
    assert "02_mosaics.py" in commands(dry) and "01_extract.py" not in commands(dry)

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
    """`make help` documents the targets and the variables a user sets."""
    result = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("all", "test", "bench", "MODEL", "IMAGES", "LAYERS", "RUN"):
        assert word in result.stdout
