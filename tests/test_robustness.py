"""Crash-proof and tamper-proof runs: inputs of two runs refused, hostile model text made
harmless (CSV, Markdown, terminal), 03's journal against torn lines and a flaky server, a full
disk, leftover temporaries, and models never loaded because a metadata file says so.

The make-level faults (kills, two makes at once) are in test_make.py.
"""
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
from markdown_it import MarkdownIt

from common.artefacts import Run
from common.cli import StageError
from common.io import (DiskFull, atomic_path, read_csv, sweep_temporaries, temp_dir, write_csv,
                       write_text)
from common.journal import read_journals
from common.provenance import ProvenanceError, read_meta, write_meta
from common import describers as D
from conftest import FAKE_MODEL, load_stage
from test_debug import LABELS, PREDS, planted_run, write_run
from test_describe import FakeVLM, make_run, run_stage
from test_trace import write_inputs as write_trace_inputs

HOSTILE = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
           "\t=1+1", "\r=1+1", "'quoted", "''twice", "[x](javascript:alert(1))",
           "![](http://tracker.example/p.png)", "<img src=x onerror=alert(1)>",
           "\x1b[31mred\x1b]0;title\x07 \u202egnp.exe"]


# --- one lineage -------------------------------------------------------------------------------

def test_02_refuses_top_images_of_one_run_and_photos_of_another(image_folder, tmp_path, capfd):
    """02 on a run folder holding another 01 run's 01_activations.npz (copied in) stops, naming
    the file."""
    extract, mosaics = load_stage("01_extract"), load_stage("02_mosaics")
    runs = []
    for name, size in (("a", "32"), ("b", "40")):
        out = tmp_path / name
        extract.main(["--images", str(image_folder), "--run", str(out), "--model", FAKE_MODEL,
                      "--layers", "relu1", "--input-size", size, "--topk", "4",
                      "--batch-size", "8", "--device", "cpu"])
        runs.append(out)
    shutil.copy(runs[1] / "01_activations.npz", runs[0] / "01_activations.npz")  # b's, copied in
    with pytest.raises(SystemExit):
        mosaics.main(["--run", str(runs[0]), "--workers", "1"])
    err = capfd.readouterr().err
    assert "differs from what 01_extract wrote" in err
    assert str(runs[0] / "01_activations.npz") in err
    assert not (runs[0] / "02_mosaics.csv").exists()


def test_06_refuses_clusters_and_keywords_of_two_runs(tmp_path):
    """05_keywords.csv of another 05 run copied into the run folder is refused: the same file
    name does not make it the same run."""
    trace = load_stage("06_trace")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, keywords_a, _ = write_trace_inputs(tmp_path / "a")
    other = {"a": {0: ["red"]}, "b": {0: ["blue"]}, "c": {0: ["green"]}}
    _, keywords_b, _ = write_trace_inputs(tmp_path / "b", clusters=other)
    shutil.copy(keywords_b, keywords_a)
    with pytest.raises(ProvenanceError, match="differs from what 05_cluster wrote"):
        trace.run(Run(tmp_path / "a"), text_embedder=object())
    assert not (tmp_path / "a" / "06_trace.csv").exists()


def test_08_refuses_predictions_of_one_run_and_statistics_of_another(tmp_path):
    """08 on a run folder holding run a's 01_predictions.csv and run b's 01_stats (copied in):
    refused before any flag."""
    debug = load_stage("08_debug")
    run_a = planted_run(tmp_path)
    rng = np.random.default_rng(1)
    run_b = tmp_path / "b"
    write_run(run_b, LABELS, PREDS, {"early": rng.normal(size=(len(LABELS), 20)),
                                     "deep": rng.normal(size=(len(LABELS), 40))})
    shutil.rmtree(run_a / "01_stats")
    shutil.copytree(run_b / "01_stats", run_a / "01_stats")
    with pytest.raises(ProvenanceError, match="differs from what 01_extract wrote") as err:
        debug.run(Run(run_a), debug.Settings(ablate_top=0))
    assert str(run_a / "01_stats") in str(err.value)
    assert not (run_a / "08_confusion.csv").exists()


def test_edited_or_unlisted_artefact_is_refused(tmp_path):
    """An output changed after its meta was written, or a file the meta does not list, is not
    taken for the stage's result."""
    out = tmp_path / "04_embeddings.npz"
    write_text(out, "vectors")
    write_meta(tmp_path / "04_embed.meta.json", "04_embed", {}, [out])
    assert read_meta(out)["_source"] == str(out)
    write_text(out, "other vectors")
    with pytest.raises(ProvenanceError, match="differs from what 04_embed wrote"):
        read_meta(out)
    write_text(tmp_path / "04_extra.csv", "x\n")
    with pytest.raises(ProvenanceError, match="not among the outputs"):
        read_meta(tmp_path / "04_extra.csv")


# --- hostile model text --------------------------------------------------------------------------

def test_csv_cells_are_neutralised_and_read_back_intact(tmp_path):
    """Cells a spreadsheet would execute start with the text mark '; numbers (also negative ones
    written as text) are untouched; read_csv gives back every cell exactly."""
    rows = [{"text": text, "number": -0.5, "as_text": "-0.25"} for text in HOSTILE]
    path = tmp_path / "hostile.csv"
    write_csv(path, rows, ["text", "number", "as_text"])
    import csv
    with open(path, newline="", encoding="utf-8") as fh:
        raw = list(csv.DictReader(fh))
    for cell in raw:
        assert not cell["text"].startswith(("=", "+", "-", "@", "\t", "\r"))
        assert cell["number"] == "-0.5" and cell["as_text"] == "-0.25"
    assert [r["text"] for r in raw[:6]] == ["'" + t for t in HOSTILE[:6]]
    assert raw[6]["text"] == "''quoted"  # the mark itself is marked, so that nothing is lost
    assert read_csv(path) == [{"text": t, "number": "-0.5", "as_text": "-0.25"} for t in HOSTILE]


def test_reports_show_hostile_text_literally(tmp_path):
    """Model text in a report (08's and 13's go through common/render.py) renders as text: in
    report.md no link, image or HTML; in report.html no element or attribute made of it."""
    from common import render as doc
    blocks = [doc.heading(HOSTILE[8], 1)] + [doc.paragraph(text) for text in HOSTILE] + [
        doc.note(HOSTILE[10]),
        doc.table(["layer", "description"], [{"layer": "deep", "description": t} for t in HOSTILE])]
    md_path, html_path = doc.write_report(tmp_path, "<script>alert(1)</script>", blocks)
    html = MarkdownIt("commonmark").enable("table").render(md_path.read_text())
    assert "<a " not in html and "<img" not in html and "<script" not in html
    assert "javascript:alert(1)" in html  # shown, as text
    assert html.count("<tr>") == len(HOSTILE) + 1  # no hostile pipe split a row
    page = html_path.read_text()
    assert "<script" not in page and "<img src=x" not in page and "<a " not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<tr>") == len(HOSTILE) + 1


def test_report_folder_names_cannot_leave_their_folder():
    """A class name becomes one folder name: no path separator, no hidden or parent folder."""
    from common.io import safe_name
    assert safe_name("../../etc/passwd", "class") == "etc_passwd"
    assert safe_name(".hidden", "class") == "hidden"
    assert safe_name("bell cote", "class") == "bell_cote"
    assert safe_name("..", "class") == "class" and safe_name("", "class") == "class"


def test_run_reports_escape_a_hostile_description(tmp_path):
    """A whole 08 run with a description that is a Markdown link and image: report.md has no
    live link or image made of it."""
    debug = load_stage("08_debug")
    run_dir = planted_run(tmp_path)
    rows = read_csv(run_dir / "03_descriptions.csv")
    rows[0]["description"] = "[click](javascript:alert(1)) ![](http://tracker.example/x.png)"
    write_csv(run_dir / "03_descriptions.csv", rows, list(rows[0]))
    write_meta(run_dir / "03_describe.meta.json", "03_describe", {},
               [run_dir / "03_descriptions.csv"], inputs=[read_meta(run_dir / "01_predictions.csv")])
    debug.run(Run(run_dir), debug.Settings(ablate_top=0))
    report = next((run_dir / "08_debug").glob("*/report.md")).read_text()
    assert "javascript" in report
    html = MarkdownIt("commonmark").enable("table").render(report)
    assert "javascript" not in "".join(line for line in html.splitlines() if "href=" in line)
    assert "tracker.example" not in "".join(line for line in html.splitlines() if "<img" in line)


def test_control_characters_stripped_from_answers_and_terminal_output():
    """Escape codes and bidi overrides are cut from answers at the source, and 07 prints none
    even from an old or edited CSV."""
    text, reason = D.clean_answer("ASSISTANT: \x1b[2J\x1b[31mred\x1b[0m stripes\x07\u202e")
    assert reason == "" and text == "[2J [31mred [0m stripes"
    assert not any(ord(c) < 32 or c == "\u202e" for c in text)
    search = load_stage("07_search")
    out = search.format_hits("q\x1b]0;x\x07", [{"rank": 1, "layer": "l\x1b[1m", "channel": 2,
                                                "score": 0.5, "cosine": 0.5,
                                                "description": HOSTILE[-1], "mosaic": None}])
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out


# --- 03's journal and the transport ---------------------------------------------------------------

def test_torn_journal_lines_are_logged_dropped_and_redescribed(tmp_path, caplog):
    """A torn last line is cut before appending (not glued to the next record) and a torn line in
    the middle is skipped; both neurons are described again and the CSV is complete."""
    run = make_run(tmp_path, channels=2)                 # 6 neurons
    run_stage(run, describer=FakeVLM())
    journal = run / "03_descriptions.part-0-of-1.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]) + lines[2][:15] + "\n" + "".join(lines[3:5])
                       + lines[5][:20])
    (run / "03_descriptions.csv").unlink()
    again = FakeVLM()
    with caplog.at_level(logging.WARNING):
        rows = run_stage(run, describer=again)
    assert sorted(again.described) == sorted([(json.loads(lines[i])["layer"],
                                               json.loads(lines[i])["channel"]) for i in (2, 5)])
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert "torn record" in caplog.text and "1 unreadable (torn) line" in caplog.text
    assert "torn record (20 bytes," in caplog.text  # the 20 bytes of lines[5] cut off
    kept = journal.read_text().splitlines()
    assert kept[2] == lines[2][:15]  # the torn middle line stays skipped; nothing was glued on
    assert all(json.loads(line) for line in kept[3:])


class StreamingVLM(FakeVLM):
    """Answers one by one, out of order, and is killed after ``kill_after`` answers."""

    def __init__(self, kill_after=None):
        """``kill_after``: answers handed over before a simulated kill."""
        super().__init__()
        self.kill_after = kill_after

    def describe_as_completed(self, neurons):
        """Yield (index, answer) from the last neuron to the first."""
        answers = self.describe(neurons)
        for count, i in enumerate(reversed(range(len(neurons)))):
            if count == self.kill_after:
                raise KeyboardInterrupt("simulated kill mid-batch")
            yield i, answers[i]


def test_each_answer_is_journaled_as_it_arrives(tmp_path):
    """A kill mid-batch keeps the answers already received: the rerun asks only for the rest."""
    run = make_run(tmp_path, channels=3)                 # 9 neurons
    first = StreamingVLM(kill_after=5)
    first.batch_size = 9                                  # one batch
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, describer=first)
    journal = (run / "03_descriptions.part-0-of-1.jsonl").read_text().splitlines()
    assert len(journal) == 5
    second = StreamingVLM()
    rows = run_stage(run, describer=second)
    assert len(second.described) == 4 and len(rows) == 9


def test_a_journal_record_is_in_the_file_the_moment_it_is_added(tmp_path):
    """A real kill (no clean-up, no flush) right after an answer must not lose it: each record is
    handed to the operating system as it is added, before any sync or close. Read by another
    reader while the journal is still open, shard 1 of 3's file already holds it."""
    from common.journal import Journal, journal_path
    out = tmp_path / "03_descriptions.csv"
    path = journal_path(out, (1, 3))
    assert path == tmp_path / "03_descriptions.part-1-of-3.jsonl"
    record = {"layer": "conv", "channel": 2, "raw": "red dots"}
    with Journal(path) as journal:
        journal.add(record)
        assert path.read_bytes() == b'{"layer": "conv", "channel": 2, "raw": "red dots"}\n'
        assert read_journals(out) == {("conv", 2): [record]}
        journal.add(record | {"raw": "blue"})
        assert read_journals(out) == {("conv", 2): [record, record | {"raw": "blue"}]}


def test_reopened_journal_cuts_even_a_one_byte_torn_record_and_warns_only_then(tmp_path, caplog):
    """A kill may leave as little as one byte of a record: reopening the journal cuts it off (the
    next record starts on a line of its own), with a warning; an empty journal, or one whose last
    record is whole, opens as it is, without one."""
    from common.journal import Journal
    path = tmp_path / "03_descriptions.part-0-of-1.jsonl"
    whole = b'{"layer": "a", "channel": 0, "raw": "red"}\n'
    with caplog.at_level(logging.WARNING):
        for content in (b"", whole):
            path.write_bytes(content)
            with Journal(path):
                pass
            assert path.read_bytes() == content
        assert "torn" not in caplog.text
        path.write_bytes(whole + b"{")
        with Journal(path) as journal:
            journal.add({"layer": "a", "channel": 1, "raw": "blue"})
    assert path.read_bytes() == whole + b'{"layer": "a", "channel": 1, "raw": "blue"}\n'
    assert "torn record (1 bytes" in caplog.text


def test_a_journal_beside_an_output_in_folders_not_made_yet_makes_them(tmp_path):
    """``--out`` may name a folder that does not exist yet, two levels deep: the journal makes
    them rather than fail on its first answer."""
    from common.journal import Journal, journal_path
    out = tmp_path / "new" / "deeper" / "03_descriptions.csv"
    with Journal(journal_path(out, (0, 1))) as journal:
        journal.add({"layer": "a", "channel": 0, "raw": "red"})
    assert read_journals(out) == {("a", 0): [{"layer": "a", "channel": 0, "raw": "red"}]}


class FillingFile:
    """A journal's file that takes at most ``chunk`` bytes per write, and fails with ``errno``
    (a full disk, say) once ``room`` bytes have been written."""

    def __init__(self, fh, room, number=errno.ENOSPC, chunk=None):
        """Wrap the open file ``fh``."""
        self.fh, self.room, self.number, self.chunk = fh, room, number, chunk

    def write(self, data):
        """Store what fits (short writes, as the operating system may do), then fail."""
        if self.room <= 0:
            raise OSError(self.number, os.strerror(self.number))
        written = self.fh.write(data[:min(self.room, self.chunk or len(data))])
        self.room -= written
        return written

    def fileno(self):
        """The real file's descriptor."""
        return self.fh.fileno()

    def close(self):
        """Close the real file."""
        self.fh.close()


def test_journal_completes_short_writes_and_cuts_a_record_the_disk_could_not_hold(tmp_path):
    """A record written in several short pieces is one whole line. When the disk fills part-way
    through a record, the part written is cut off (no torn line: the records before it stay
    readable) and the error says disk full; a denied write becomes one line naming the journal;
    any other error is raised as it is, the partial record cut off too."""
    from common.journal import Journal
    out = tmp_path / "03_descriptions.csv"
    path = tmp_path / "03_descriptions.part-0-of-1.jsonl"
    first = {"layer": "conv", "channel": 0, "raw": "red dots"}
    with Journal(path) as journal:
        journal.fh = FillingFile(journal.fh, room=10 ** 6, chunk=7)
        journal.add(first)
    assert path.read_text() == json.dumps(first) + "\n"
    cases = [(errno.ENOSPC, DiskFull, f"disk full: {tmp_path}"),
             (errno.EACCES, StageError, f"cannot use {path}: permission denied"),
             (errno.EIO, OSError, "Input/output error")]
    for channel, (number, kind, words) in enumerate(cases, start=1):
        with Journal(path) as journal:
            journal.fh = FillingFile(journal.fh, room=20, number=number)
            with pytest.raises(kind, match=re.escape(words)):
                journal.add({"layer": "conv", "channel": channel, "raw": "a long answer " * 5})
        assert path.read_text() == json.dumps(first) + "\n", number
    assert read_journals(out) == {("conv", 0): [first]}


def test_failed_neurons_keep_the_stage_out_of_date_with_a_summary(tmp_path, caplog):
    """Failed neurons: the CSV is written for the later stages, a summary says how many and why,
    and the meta is older than every input, so make runs 03 again."""
    run = make_run(tmp_path, channels=2)
    with caplog.at_level(logging.WARNING):
        rows = run_stage(run, describer=FakeVLM(fail=[("mid", 1), ("deep", 0)]))
    assert len(rows) == 6
    meta_file = run / "03_describe.meta.json"
    assert meta_file.stat().st_mtime < (run / "02_mosaics.csv").stat().st_mtime
    assert json.loads(meta_file.read_text())["failure_reasons"] == {"server said no": 2}
    assert "2 of 6 neurons have no description (2 × server said no)" in caplog.text
    assert "out of date for make" in caplog.text
    run_stage(run, describer=FakeVLM())
    assert meta_file.stat().st_mtime >= (run / "02_mosaics.csv").stat().st_mtime


def _raw_server(reply: bytes):
    """A loopback server that answers every request with the bytes ``reply`` (b"" resets the
    connection); returns (port, closer)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve():
        """Accept, read a request, answer, close."""
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(1 << 20)
                    if reply:
                        conn.sendall(reply)
                    else:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        """Stop serving."""
        stop.set()
        thread.join(2)
        srv.close()
    return srv.getsockname()[1], close


@pytest.mark.parametrize("reply, reason", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 900\r\n\r\n"
     b"{\"choices\": [", "connection error"),                      # truncated body
    (b"HTXP/9 what is this\r\n\r\n", "connection error"),           # bad status line
    (b"", "connection error"),                                      # connection reset
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>",
     "the server's answer is not JSON: <html>"),                    # not JSON
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
     b"oops\x1b[2J!!", "the server's answer is not JSON: oops\\x1b[2J!!"),  # says JSON, is not
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
     "the server's answer is not a chat completion (no choices[0].message.content): []"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n"
     b'{"choices": [{"message": {"content": 7}}]}', "the server's answer holds no text"),
])
def test_transport_errors_are_recorded_failures(tmp_path, reply, reason):
    """Whatever goes wrong on the wire becomes a failed neuron with its reason in the journal,
    not a traceback; as it hits every neuron, the stage stops with one line naming the model
    and that reason."""
    port, close = _raw_server(reply)
    try:
        run = make_run(tmp_path, channels=1)
        desc = D.OpenAIDescriber(f"http://127.0.0.1:{port}/v1", "m", api_key_env="NO_SUCH_KEY",
                                 concurrency=2, timeout=2, retries=0)
        with pytest.raises(StageError) as err:
            run_stage(run, describer=desc)
    finally:
        close()
    assert "m (openai) failed on all 3 neurons" in str(err.value)
    assert f" × {reason}" in str(err.value) and "\n" not in str(err.value)
    records = [r[-1] for r in read_journals(run / "03_descriptions.csv").values()]
    assert len(records) == 3 and all(r["error"].startswith(reason) for r in records), records
    assert "StopIteration" not in records[0]["error"]


# --- a full disk ----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (needs root); skipped where it cannot be mounted."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: even if a file stayed open


def fill(folder, leave: int) -> None:
    """Fill ``folder``'s file system up to ``leave`` free bytes."""
    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def no_partial_files(folder) -> list[str]:
    """Files under ``folder`` that a stage left (other than the ballast)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name != "ballast")


def test_full_disk_in_01_is_one_clear_line(image_folder, small_disk, capfd):
    """01 on a disk too small for its statistics stops with one line naming the folder and the
    space needed, and leaves no file behind."""
    extract = load_stage("01_extract")
    fill(small_disk, 6_000)
    with pytest.raises(SystemExit) as exit_:
        extract.main(["--images", str(image_folder), "--run", str(small_disk), "--model",
                      FAKE_MODEL, "--layers", "relu1,conv2", "--input-size", "32", "--topk", "4",
                      "--batch-size", "8", "--device", "cpu"])
    assert exit_.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if "ERROR" in line]
    assert len(err) == 1 and f"disk full: {small_disk}" in err[0] and "is needed" in err[0]
    assert "Traceback" not in err[0] and no_partial_files(small_disk) == []


def test_full_disk_in_03_keeps_the_journal_whole(tmp_path, small_disk, caplog):
    """03's journal on a full disk: a clear DiskFull, no torn line, and what was journaled stays."""
    run = make_run(tmp_path, channels=3)
    out = small_disk / "03_descriptions.csv"
    fill(small_disk, 300)
    with pytest.raises(DiskFull, match=f"disk full: {small_disk}"):
        D.describe(run / "02_mosaics.csv", out, activations=run / "01_activations.npz",
              predictions=run / "01_predictions.csv", describer=FakeVLM())
    journal = small_disk / "03_descriptions.part-0-of-1.jsonl"
    text = journal.read_text()
    assert text == "" or text.endswith("\n")
    assert not out.exists()


def test_full_disk_in_05_is_one_clear_line(tmp_path, monkeypatch, capfd):
    """05 writing its CSVs when the disk fills (ENOSPC injected into the file write): one line,
    no partial file under a final name, no temporary left."""
    import test_cluster
    cluster = test_cluster.stage
    d1, x1, f1, _ = test_cluster.planted_layer(6, 2, seed=3)
    desc, emb = test_cluster.write_inputs(tmp_path, {"only": (d1, x1, f1)})
    test_cluster.fake_embedders_module(monkeypatch)
    out = tmp_path  # the run folder
    real_write = type(out).write_bytes

    def write_half(self, data):
        """Write half of ``data``, then fail as a full disk does."""
        if self.name.startswith(".05_"):
            real_write(self, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(type(out), "write_bytes", write_half)
    with pytest.raises(SystemExit) as exit_:
        cluster.main(["--run", str(out), "--k-max", "3", "--projection", "pca"])
    assert exit_.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if "ERROR" in line]
    assert len(err) == 1 and f"disk full: {out}" in err[0] and "is needed" in err[0]
    assert not list(out.glob("05_*.csv")) and not list(out.rglob(".*tmp-*"))


# --- temporaries ----------------------------------------------------------------------------------

def test_temporaries_of_dead_processes_are_swept(tmp_path):
    """A killed writer's temporary file and scratch folder are removed by the next run; a live
    process's are kept."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    with atomic_path(tmp_path / "x.csv") as live_tmp:
        live_tmp.write_text("being written")
        scratch = temp_dir(tmp_path / "02_mosaics", "cache")
        (scratch / "images.npy").write_bytes(b"0" * 10)
        dead_file = tmp_path / live_tmp.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
        dead_dir = tmp_path / "02_mosaics" / scratch.name.replace(f"-{os.getpid()}-",
                                                                  f"-{dead.pid}-")
        dead_file.write_text("half")
        shutil.copytree(scratch, dead_dir)
        assert sweep_temporaries(tmp_path) == 2
        assert live_tmp.exists() and scratch.exists()
        assert not dead_file.exists() and not dead_dir.exists()
    shutil.rmtree(scratch)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["02_mosaics", "x.csv"]


# --- no unpickling because a meta says so -----------------------------------------------------

def test_08_loads_model_files_only_when_named_again(tmp_path, monkeypatch):
    """A model or weights file, or --unsafe-pickle, recorded in 01's meta is not enough: 08 (and
    03, through the same common.models.reload_model) loads a file only when the user names it
    again, and unpickles only with its own flag."""
    import common.models
    from common.models import reload_model
    calls = []
    monkeypatch.setattr(common.models, "load_model", lambda name, **kw: calls.append((name, kw)))
    evil = str(tmp_path / "evil.pt")
    meta = {"model": {"name": evil, "weights": None, "unsafe_pickle": True, "input_size": 32}}
    with pytest.raises(StageError, match="pass --model"):
        reload_model(meta, None, None, False, "cpu")
    with pytest.raises(StageError, match="pass --model"):
        reload_model(meta, str(tmp_path / "other.pt"), None, False, "cpu")
    reload_model(meta, evil, None, False, "cpu")
    assert calls[-1] == (evil, {"weights": None, "random_init": False, "unsafe_pickle": False,
                                "device": "cpu", "input_size": 32, "mean": None, "std": None,
                                "classes": None})
    reload_model(meta, evil, None, True, "cpu")
    assert calls[-1][1]["unsafe_pickle"] is True
    factory = {"model": {"name": f"{tmp_path}/m.py:build", "weights": None}}
    with pytest.raises(StageError, match="pass --model"):
        reload_model(factory, None, None, False, "cpu")
    weights = {"model": {"name": "resnet18", "weights": str(tmp_path / "w.pth")}}
    with pytest.raises(StageError, match="pass --weights"):
        reload_model(weights, None, None, False, "cpu")
    builtin = {"model": {"name": "efficientnet_lite0", "weights": None}}
    reload_model(builtin, None, None, False, "cpu")
    assert calls[-1][0] == "efficientnet_lite0"


@pytest.mark.parametrize("value, passed", [("1", True), ("0", False)])
def test_makefile_passes_unsafe_pickle_to_08(tmp_path, value, passed):
    """UNSAFE_PICKLE=1 reaches 08 as its own flag (it is never read from 01's meta)."""
    from conftest import ROOT
    dry = subprocess.run(["make", "-n", "--no-print-directory", f"UNSAFE_PICKLE={value}",
                          f"DATA={tmp_path}", "all"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    recipe_08 = dry.stdout[dry.stdout.index("08_debug.py"):]
    assert ("--unsafe-pickle" in recipe_08) == passed
