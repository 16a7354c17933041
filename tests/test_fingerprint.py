"""common/fingerprint.py: what makes Make re-run stage 01, and what does not."""
import os

import pytest

from common.fingerprint import InputError, fingerprint


def test_weights_and_csv_lists_by_content_and_stat(tmp_path):
    """WEIGHTS count by content (a touch changes nothing, new bytes do); a CSV list counts by its
    own bytes and by the size and mtime of each file it names, not by files it does not name."""
    (tmp_path / "a.png").write_bytes(b"aaaa")
    (tmp_path / "other.png").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path,label\na.png,cat\n")
    (tmp_path / "w.pt").write_bytes(b"weights-1")

    def fp():
        """The fingerprint of the list, a torchvision name and the weights file."""
        return fingerprint(str(tmp_path / "list.csv"), "resnet18", str(tmp_path / "w.pt"), None)
    first = fp()
    os.utime(tmp_path / "w.pt", ns=(1, 1))
    (tmp_path / "other.png").write_bytes(b"yy")
    assert fp() == first
    (tmp_path / "w.pt").write_bytes(b"weights-2")
    second = fp()
    assert second != first
    st = os.stat(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fp() != second
    (tmp_path / "list.csv").write_text("path,label\na.png,dog\n")
    assert len({first, second, fp()}) == 3


def test_folder_walk_sees_deep_changes_and_skips_hidden(tmp_path):
    """A file added two folders down changes the fingerprint; a hidden file does not; a missing
    IMAGES or WEIGHTS is an error naming it."""
    (tmp_path / "imgs" / "cat" / "indoor").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "a\nb.png").write_bytes(b"1")
    first = fingerprint(str(tmp_path / "imgs"), "efficientnet_lite0", None, None)
    (tmp_path / "imgs" / "cat" / ".DS_Store").write_bytes(b"junk")
    assert fingerprint(str(tmp_path / "imgs"), "efficientnet_lite0", None, None) == first
    (tmp_path / "imgs" / "cat" / "indoor" / "b.png").write_bytes(b"2")
    assert fingerprint(str(tmp_path / "imgs"), "efficientnet_lite0", None, None) != first
    with pytest.raises(InputError, match="IMAGES=.*does not exist"):
        fingerprint(str(tmp_path / "nope"), "efficientnet_lite0", None, None)
    with pytest.raises(InputError, match="WEIGHTS file"):
        fingerprint(None, "resnet18", str(tmp_path / "w.pt"), None)


@pytest.mark.parametrize("name", ["net.pt", "net.pth", "net.ckpt", "net.bin", "net.py:build"])
def test_a_model_file_counts_by_content(tmp_path, name):
    """MODEL given as a checkpoint (or a .py builder) is fingerprinted by its bytes: new weights
    in the same file re-run 01, a touch does not; a missing file is an error naming MODEL."""
    path = tmp_path / name.partition(":")[0]
    model = str(tmp_path / name)
    path.write_bytes(b"weights-1")
    first = fingerprint(None, model, None, None)
    os.utime(path, ns=(1, 1))
    assert fingerprint(None, model, None, None) == first
    path.write_bytes(b"weights-2")
    assert fingerprint(None, model, None, None) != first
    path.unlink()
    with pytest.raises(InputError, match="MODEL file"):
        fingerprint(None, model, None, None)


@pytest.mark.parametrize("name,sep", [("list.csv", ","), ("list.tsv", "\t")])
def test_the_path_column_is_found_by_name_wherever_it_stands(tmp_path, name, sep, monkeypatch):
    """The list's path column is found by its name (any case, spaces around it), not its
    position; relative paths are read from the list's folder, absolute ones as they are; a .tsv
    is split on tabs."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"aaaa")
    (tmp_path / "b.png").write_bytes(b"bb")
    # columns named before and after "path" in sort order stand on either side of it
    (tmp_path / name).write_text(f"label{sep}split{sep} Path \ncat{sep}train{sep}imgs/a.png\n"
                                 f"dog{sep}test{sep}{tmp_path / 'b.png'}\n")
    monkeypatch.chdir(tmp_path / "imgs")  # relative to the list, not to where make runs

    def fp():
        """The fingerprint of the list alone."""
        return fingerprint(str(tmp_path / name), "resnet18", None, None)
    seen = {fp()}
    for image in (tmp_path / "imgs" / "a.png", tmp_path / "b.png"):
        image.write_bytes(image.read_bytes() + b"more")  # a new size: each named file counts
        seen.add(fp())
    assert len(seen) == 3


def test_fingerprint_by_hand_and_unreadable_inputs(tmp_path):
    """The digest is blake2b-128 of one line per input ("WEIGHTS <blake2b-128 of its bytes>");
    a list that is not UTF-8 counts by its bytes alone; a file that cannot be read is an
    InputError naming it."""
    import hashlib
    from common.fingerprint import content_digest
    (tmp_path / "w.pt").write_bytes(b"abc")
    inner = hashlib.blake2b(b"abc", digest_size=16).hexdigest()
    assert fingerprint(None, "resnet18", str(tmp_path / "w.pt"), None) == \
        hashlib.blake2b(f"WEIGHTS {inner}\n".encode(), digest_size=16).hexdigest()
    assert fingerprint(None, "resnet18", None, None) == hashlib.blake2b(digest_size=16).hexdigest()
    (tmp_path / "list.csv").write_bytes(b"\xff\xfepath\n\x00a.png\n")
    first = fingerprint(str(tmp_path / "list.csv"), "resnet18", None, None)
    (tmp_path / "list.csv").write_bytes(b"\xff\xfepath\n\x00b.png\n")
    assert fingerprint(str(tmp_path / "list.csv"), "resnet18", None, None) != first
    with pytest.raises(InputError, match="cannot read"):
        content_digest(tmp_path)  # a folder
    # an image that is gone is listed as missing, not an error
    from common.fingerprint import stat_line
    assert stat_line(str(tmp_path / "gone.png")) == "missing"
    st = (tmp_path / "w.pt").stat()
    assert stat_line(str(tmp_path / "w.pt")) == f"3 {st.st_mtime_ns}"


def test_a_txt_list_is_read_with_commas_and_a_tsv_one_with_tabs(tmp_path):
    """Only a .tsv list is split on tabs: a .txt (or .csv) list with a path column is read with
    commas, so an edit to a file it names changes the fingerprint."""
    from common.fingerprint import csv_lines
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    for name, sep in (("list.txt", ","), ("list.csv", ","), ("list.tsv", "\t")):
        listing = tmp_path / name
        listing.write_text(f"label{sep}path\ncat{sep}a.png\n")
        lines = list(csv_lines(listing))
        assert any("a.png" in str(line) for line in lines[1:]), name
