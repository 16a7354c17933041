"""The append-only journal of a describer's answers, so that an interrupted run loses nothing.

One JSON line per answer, written as it arrives (a kill loses none) and synced to disk per batch;
a line torn by a kill or a full disk is dropped and its neuron described again. Each shard of a
run (``--shard i/N``) has its own file beside the output, ``<out>.part-<i>-of-<N>.jsonl``; the
run that completes the set reads all of them (``read_journals``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from common.cli import FULL, StageError, file_system_problem
from common.io import DiskFull

log = logging.getLogger("neuron-atlas.journal")


def journal_path(out: Path, shard: tuple[int, int]) -> Path:
    """The append-only progress file of one shard (the whole run is shard 0/1)."""
    return out.with_name(f"{out.stem}.part-{shard[0]}-of-{shard[1]}.jsonl")


class Journal:
    """A shard's journal opened for appending: one JSON line per answer, handed to the operating
    system as it arrives (a kill of the process loses none) and synced to disk per batch."""

    def __init__(self, path: Path):
        """Remember the file; nothing is opened yet."""
        self.path = path

    def __enter__(self) -> "Journal":
        """Drop a torn last line (a kill or a full disk mid-write), then open for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "ab+", buffering=0)
        size = self.fh.seek(0, os.SEEK_END)
        if size and os.pread(self.fh.fileno(), 1, size - 1) != b"\n":
            keep = os.pread(self.fh.fileno(), size, 0).rfind(b"\n") + 1
            self.fh.truncate(keep)
            log.warning("%s ended in a torn record (%d bytes, from a kill or a full disk); it is "
                        "dropped and its neuron described again", self.path.name, size - keep)
        return self

    def add(self, record: dict) -> None:
        """Append one record; on a full disk, cut off what part of it was written and stop."""
        line = (json.dumps(record) + "\n").encode("utf-8")
        size = os.fstat(self.fh.fileno()).st_size
        try:
            written = 0
            while written < len(line):
                written += self.fh.write(line[written:])
        except OSError as err:
            os.ftruncate(self.fh.fileno(), size)
            if err.errno in FULL:
                raise DiskFull(self.path.parent, len(line)) from err
            message = file_system_problem(err, self.path)
            if message is None:
                raise
            raise StageError(message) from err

    def sync(self) -> None:
        """Make the records so far survive a power cut, not only a kill."""
        os.fsync(self.fh.fileno())

    def __exit__(self, *exc) -> None:
        """Close the file."""
        self.fh.close()


def read_journals(out: Path) -> dict[tuple[str, int], list[dict]]:
    """All journal records per (layer, channel), oldest first, over the journals beside ``out``.

    Unreadable lines (torn by a kill or a full disk) are skipped and counted in the log: their
    neurons are simply described again.
    """
    records: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(out.parent.glob(f"{out.stem}.part-*-of-*.jsonl")):
        torn = 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    key = (rec["layer"], int(rec["channel"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    torn += 1
                    continue
                records.setdefault(key, []).append(rec)
        if torn:
            log.warning("%s: %d unreadable (torn) line(s) skipped; their neurons are described "
                        "again", path.name, torn)
    return records
