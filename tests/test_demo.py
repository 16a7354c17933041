"""Tests of tools/demo.py: the offline demo set is reproducible, honestly labelled and loadable."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common import imagenet
from tools import demo
from common.cli import StageError
from common.images import list_images, load_rgb, map_labels
from common.io import read_csv

N_SMALL = 40  # ≥ the number of source photos, so every photo appears


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One small demo build shared by the read-only tests."""
    out = tmp_path_factory.mktemp("demo") / "set"
    demo.build_demo_set(out, n_images=N_SMALL, seed=0)
    return out


def test_same_arguments_give_identical_bytes(built, tmp_path):
    again = tmp_path / "again"
    demo.build_demo_set(again, n_images=N_SMALL, seed=0)
    assert tree_bytes(again) == tree_bytes(built)


def test_other_seed_changes_augmented_views_only(built, tmp_path):
    other = tmp_path / "other"
    demo.build_demo_set(other, n_images=N_SMALL, seed=1)
    first, second = tree_bytes(built), tree_bytes(other)
    assert first.keys() == second.keys()
    views = [k for k in first if k.endswith(".jpg")]
    changed = [k for k in views if first[k] != second[k]]
    unchanged = {k for k in views if first[k] == second[k]}
    assert unchanged == {k for k in views if k.endswith("_0000.jpg")}  # view 0: the whole photo
    assert len(changed) == N_SMALL - len(demo.SOURCES)


def test_rebuild_is_skipped_when_complete_and_redone_when_not(tmp_path):
    out = tmp_path / "set"
    demo.build_demo_set(out, n_images=20, seed=0)
    manifest, listing = out / "manifest.json", out / "images.csv"
    stamp = manifest.stat().st_mtime_ns
    os.utime(listing, ns=(0, 0))
    demo.build_demo_set(out, n_images=20, seed=0)
    assert manifest.stat().st_mtime_ns == stamp  # nothing rewritten
    assert listing.stat().st_mtime_ns > 0  # but the listing is stamped fresh for Make

    victim = next(out.rglob("*_0001.jpg"))
    victim.unlink()
    demo.build_demo_set(out, n_images=20, seed=0)
    assert victim.is_file()  # an incomplete set is rebuilt

    demo.build_demo_set(out, n_images=25, seed=0)
    assert len(read_csv(out / "images.csv")) == 25
    assert not list(tmp_path.glob(".set*"))  # no temporary or old folders left behind


def test_side_sets_the_view_size_and_a_new_side_rebuilds(tmp_path):
    """Benchmarks ask for photo-sized views; a build of another size is not taken as complete."""
    out = tmp_path / "set"
    demo.build_demo_set(out, n_images=20, seed=0, side=40)
    sizes = {load_rgb(p)[0].size for p in out.rglob("*.jpg")}
    assert sizes == {(40, 40)}
    assert "--side 40" in (out / "README.txt").read_text(encoding="utf-8")  # how to rebuild it
    assert not demo.is_complete(out, 20, 0)  # the default side is another set
    demo.build_demo_set(out, n_images=20, seed=0)
    assert {load_rgb(p)[0].size for p in out.rglob("*.jpg")} == {(demo.OUT_SIDE,) * 2}


def test_labels_are_imagenet_synsets_in_matching_folders(built):
    rows = read_csv(built / "images.csv")
    assert len(rows) == N_SMALL
    names = dict(zip(imagenet.synsets(), imagenet.class_names()))
    labelled = [r for r in rows if r["label"]]
    assert {r["label"] for r in labelled} == {p.synset for p, _ in demo.SOURCES if p.synset}
    for row in labelled:
        assert row["path"].split("/")[0] == row["label"]
        assert row["class_name"] == names[row["label"]]
    for row in rows:
        if not row["label"]:
            assert "/" not in row["path"] and row["class_name"] == ""
    mapping, unmapped = map_labels([r["label"] for r in rows], imagenet.class_names(),
                                   imagenet.synsets())
    assert unmapped == [] and set(mapping) == {r["label"] for r in labelled}


def test_folder_and_csv_list_the_same_images(built):
    from_csv = [(Path(e.path).relative_to(built).as_posix(), e.label)
                for e in list_images(built / "images.csv")]
    from_folder = [(Path(e.path).relative_to(built).as_posix(), e.label)
                   for e in list_images(built)]
    assert from_csv == from_folder
    assert len({source for source in (r["source"] for r in read_csv(built / "images.csv"))}) \
        == len(demo.SOURCES)


def test_every_view_loads_as_plain_rgb_of_network_size(built):
    for entry in list_images(built / "images.csv"):
        image, note = load_rgb(entry.path)
        assert image.size == (demo.OUT_SIDE, demo.OUT_SIDE) and note == ""


def test_manifest_and_readme_describe_the_set(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["parameters"]["n_images"] == N_SMALL
    assert sum(p["views"] for p in manifest["photos"]) == N_SMALL
    assert set(manifest["files"]) == {r["path"] for r in read_csv(built / "images.csv")}
    readme = (built / "README.txt").read_text()
    for photo, _ in demo.SOURCES:
        assert photo.name in readme and photo.why in readme
    assert "cannot show" in readme


@pytest.mark.parametrize("n_images", [1, 7, 19, 40, 1500])
def test_allocation_sums_and_favours_labelled_photos(n_images):
    photos = [p for p, _ in demo.SOURCES]
    counts = demo.allocate(n_images, photos)
    assert sum(counts) == n_images and len(counts) == len(photos)
    if n_images >= len(photos):
        assert min(counts) >= 1
    if n_images >= 10 * len(photos):
        labelled = [c for p, c in zip(photos, counts) if p.synset]
        unlabelled = [c for p, c in zip(photos, counts) if not p.synset]
        assert min(labelled) > max(unlabelled)


@pytest.mark.parametrize("n_images, expected", [
    (1, [1, 0, 0, 0, 0]),          # shares 1/3, 1/3, 1/9 × 3: the remainder to the first largest
    (4, [1, 1, 1, 1, 0]),          # fewer views than photos: largest remainders, then photo order
    (5, [1, 1, 1, 1, 1]),          # 5/3, 5/3, 5/9 × 3 → 2, 2, 1, 0, 0, then each photo gets one
    (20, [7, 7, 2, 2, 2]),         # 6.67, 6.67, 2.22 × 3: two left over go to the labelled ones
    (100, [34, 33, 11, 11, 11]),   # 33.3, 33.3, 11.1 × 3: one left over, to the first labelled
])
def test_allocation_by_hand(n_images, expected):
    """Two labelled photos (weight LABELLED_WEIGHT = 3) and three unlabelled ones (weight 1):
    views are the shares n × w / 9 rounded by largest remainder, at least one each when n ≥ 5."""
    from types import SimpleNamespace
    assert demo.LABELLED_WEIGHT == 3
    photos = [SimpleNamespace(synset=s) for s in ("n1", "n2", "", "", "")]
    assert demo.allocate(n_images, photos) == expected


def test_foreign_folder_is_never_replaced(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(StageError, match="not replaced"):
        demo.build_demo_set(precious, n_images=5)
    assert (precious / "holiday.jpg").read_bytes() == b"mine"


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    demo.main([str(out), "--n-images", "21", "--seed", "3"])
    assert len(read_csv(out / "images.csv")) == 21
    with pytest.raises(SystemExit) as info:
        demo.main([str(tmp_path / "none"), "--n-images", "0"])
    assert info.value.code == 2
