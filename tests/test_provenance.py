"""common/io.py and common/provenance.py: atomic writes, reproducible .npz, lineage checks."""
import os

import numpy as np
import pytest

from common.io import NpyRowWriter, atomic_path, load_npz, save_npz, write_text
from common.provenance import ProvenanceError, merge_lineage, read_meta, write_meta


def test_failed_write_keeps_the_old_file(tmp_path):
    """An exception inside atomic_path leaves the previous content and no temporary file."""
    target = tmp_path / "out.csv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    umask = os.umask(0o022)
    os.umask(umask)
    # mkstemp makes 0600 files; an output gets the permissions of any file the user creates.
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_npz_bytes_are_reproducible(tmp_path):
    """Saving equal arrays twice gives identical bytes (no timestamps), and they load back."""
    arrays = {"b/values": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array(["x", "y"])}
    save_npz(tmp_path / "1.npz", arrays)
    save_npz(tmp_path / "2.npz", dict(reversed(list(arrays.items()))))
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    back = load_npz(tmp_path / "1.npz")
    np.testing.assert_array_equal(back["b/values"], arrays["b/values"])


def test_lineage_is_inherited_and_mismatches_refused(tmp_path):
    """A stage's meta carries its inputs' lineage; inputs from two different 01 runs clash."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run, content in ((run_a, "first"), (run_b, "second")):
        write_text(run / "01_activations.npz", content)
        write_meta(run / "01_extract.meta.json", "01_extract", {}, [run / "01_activations.npz"])
        write_text(run / "02_mosaics.csv", "layer,channel\n")
        write_meta(run / "02_mosaics.meta.json", "02_mosaics", {}, [run / "02_mosaics.csv"],
                   inputs=[read_meta(run / "01_activations.npz")])
    meta_a = read_meta(run_a / "02_mosaics.csv")
    assert meta_a["lineage"]["01_extract"] == read_meta(run_a / "01_activations.npz")["fingerprint"]
    merge_lineage([meta_a, read_meta(run_a / "01_activations.npz")])  # same run: fine
    with pytest.raises(ProvenanceError, match="01_extract") as clash:
        merge_lineage([meta_a, read_meta(run_b / "01_activations.npz")])
    # the message names both artefacts, so the user knows which input to replace
    assert str(run_a / "02_mosaics.csv") in str(clash.value)
    assert str(run_b / "01_activations.npz") in str(clash.value)


def test_missing_meta_is_a_clear_error(tmp_path):
    """An artefact without its stage's meta asks for the stage to be re-run."""
    write_text(tmp_path / "03_descriptions.csv", "x\n")
    with pytest.raises(ProvenanceError, match="re-run the stage"):
        read_meta(tmp_path / "03_descriptions.csv")


def test_an_artefact_edited_in_place_is_refused_by_its_content(tmp_path):
    """A file (or a file in a folder artefact) whose bytes changed after its meta was written is
    refused even when its name, size and modification time are those the stage left: only the
    SHA-256 of its content tells."""
    single = tmp_path / "04_embeddings.npz"
    folder = tmp_path / "01_stats"
    write_text(single, "vectors-1")
    write_text(folder / "relu1.max.npy", "values-1")
    write_meta(tmp_path / "04_embed.meta.json", "04_embed", {}, [single])
    write_text(folder / "relu1.mean.npy", "values-1")
    write_meta(tmp_path / "01_extract.meta.json", "01_extract", {}, sorted(folder.iterdir()))
    for artefact, edited, stage in ((single, single, "04_embed"),
                                    (folder, folder / "relu1.max.npy", "01_extract")):
        assert read_meta(artefact)["stage"] == stage
        before = os.stat(edited)
        with open(edited, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            fh.write(b"2")   # same size
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(ProvenanceError, match=f"differs from what {stage} wrote"):
            read_meta(artefact)


def test_npy_row_writer_fills_a_loadable_array_and_checks_the_row_count(tmp_path):
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    writer = NpyRowWriter(tmp_path / "a.npy", 6, 2)
    for block in (rows[:1], rows[1:4], rows[4:]):
        writer.write(block)
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", mmap_mode="r"), rows)
    short = NpyRowWriter(tmp_path / "b.npy", 6, 2)
    short.write(rows[:5])
    with pytest.raises(ValueError, match="wrote 5 rows"):
        short.close()
    with pytest.raises(ValueError, match="2 columns"):
        NpyRowWriter(tmp_path / "c.npy", 6, 2).write(np.zeros((1, 3)))


def test_npz_members_unpack_as_ordinary_readable_files(tmp_path):
    """Each array is an uncompressed member named after it, in name order, dated 1980-01-01 and
    with rw-r--r-- permissions, so that `unzip` of an artefact gives ordinary files."""
    import zipfile
    save_npz(tmp_path / "a.npz", {"z": np.zeros(2), "a/b": np.ones(3)})
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["a/b.npy", "z.npy"]
    for info in infos:
        assert info.external_attr >> 16 == 0o644 and info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_STORED


def test_any_edit_is_refused_whichever_way_its_digest_sorts(tmp_path):
    """An edit is refused whether its SHA-256 sorts before or after the recorded one (the check
    is equality, not an order)."""
    import hashlib
    artefact = tmp_path / "05_clusters.csv"
    write_text(artefact, "original\n")
    digest = hashlib.sha256(b"original\n").hexdigest()
    edits = [f"edit {i}\n" for i in range(20)]
    lower = next(e for e in edits if hashlib.sha256(e.encode()).hexdigest() < digest)
    higher = next(e for e in edits if hashlib.sha256(e.encode()).hexdigest() > digest)
    for edit in (lower, higher):
        write_text(artefact, "original\n")
        write_meta(tmp_path / "05_cluster.meta.json", "05_cluster", {}, [artefact])
        write_text(artefact, edit)
        with pytest.raises(ProvenanceError, match="differs from what 05_cluster wrote"):
            read_meta(artefact)


def test_meta_fingerprint_and_args_by_hand(tmp_path):
    """A stage's fingerprint is the first 16 hex digits of the SHA-256 of its outputs' names and
    digests in path order (so not of their folder); arguments that are functions are left out."""
    import hashlib
    from common.provenance import fingerprint
    hashes = {"run/b.npz": "22", "run/a.csv": "11"}
    by_hand = hashlib.sha256(b"a.csv" b"11" b"b.npz" b"22").hexdigest()[:16]
    assert fingerprint(hashes) == by_hand and len(by_hand) == 16
    assert fingerprint({"elsewhere/a.csv": "11", "elsewhere/b.npz": "22"}) == by_hand
    write_text(tmp_path / "out.csv", "x\n")
    meta = write_meta(tmp_path / "s.meta.json", "s", {"k": 3, "hook": print, "name": "a"},
                      [tmp_path / "out.csv"])
    assert meta["args"] == {"k": 3, "name": "a"}
    assert meta["fingerprint"] == meta["lineage"]["s"] == fingerprint(
        {str(tmp_path / "out.csv"): hashlib.sha256(b"x\n").hexdigest()})


def test_retracting_a_meta_that_is_not_there_is_not_an_error(tmp_path):
    """A stage's first run retracts its meta before any exists: nothing happens; a meta that
    exists is removed."""
    from common.provenance import retract_meta
    retract_meta(tmp_path / "05_cluster.meta.json")
    meta = tmp_path / "09_score.meta.json"
    meta.write_text("{}")
    retract_meta(meta)
    assert not meta.exists() and list(tmp_path.iterdir()) == []


def test_an_npz_holding_a_pickle_is_refused_not_unpickled(tmp_path):
    """Artefacts are plain arrays: an .npz holding a pickled object (which could run code when
    loaded) is refused by load_npz instead of being unpickled."""
    path = tmp_path / "hostile.npz"
    np.savez(path, payload=np.array([{"any": "object"}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(path)
