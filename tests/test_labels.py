"""Reading labels: a CSV or a train/val tree, and every way they can be wrong."""

from __future__ import annotations

import json

import pytest
from conftest import make_image, python_in_new_process
from labelled import make_labelled_tree

from snakembed.labels import LabelError, read_labels

EXTENSIONS = [".png", ".jpg"]


def test_a_tree_gives_classes_from_folder_names(tmp_path):
    truth = make_labelled_tree(tmp_path, train=2, val=1)
    (tmp_path / "train" / "red" / "notes.txt").write_text("not an image")
    labelled = read_labels(tmp_path, tmp_path, EXTENSIONS)
    assert labelled.categories == ["blue", "green", "red"]
    assert (labelled.count("train"), labelled.count("val")) == (6, 3)
    got = {
        p.relative_to(tmp_path).as_posix(): lab
        for p, lab in zip(labelled.paths, labelled.labels, strict=True)
    }
    assert got == {**truth["train"], **truth["val"]}


def test_a_csv_with_a_header_and_splits(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_image(tmp_path / "images" / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\na.jpg,cat,train\nb.jpg,dog,train\nc.jpg,dog,val\n")
    labelled = read_labels(csv, tmp_path / "images", EXTENSIONS)
    assert [p.name for p in labelled.paths] == ["a.jpg", "b.jpg", "c.jpg"]
    assert labelled.labels == ["cat", "dog", "dog"] and labelled.splits == ["train", "train", "val"]


def test_a_csv_without_splits_holds_out_a_stable_share(tmp_path):
    rows = []
    for i in range(200):
        make_image(tmp_path / f"{i}.jpg", size=(8, 8))
        rows.append(f"{i}.jpg,{'even' if i % 2 == 0 else 'odd'}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows))
    first = read_labels(csv, tmp_path, EXTENSIONS, val_fraction=0.25)
    assert 30 <= first.count("val") <= 70  # about a quarter of 200
    # the same split in another process (another string-hash seed), as a rerun gets
    again = python_in_new_process(
        "import json\n"
        "from snakembed.labels import read_labels\n"
        f"labelled = read_labels({str(csv)!r}, {str(tmp_path)!r}, {EXTENSIONS!r}, 0.25)\n"
        "print(json.dumps(labelled.splits))"
    )
    assert json.loads(again) == first.splits


@pytest.mark.parametrize(
    "rows,message",
    [
        ("a.jpg\n", r"row 1 is \['a.jpg'\]; each row must be `path,label`"),
        ("a.jpg,cat,test\n", r"row 1 has split 'test'; use train or val"),
        (
            "a.jpg,cat,train\nmissing.jpg,dog,train\n",
            r"1 labelled image\(s\) do not exist.*missing",
        ),
        ("a.jpg,cat,train\nb.jpg,cat,val\n", r"1 class\(es\) among its train images"),
        ("a.jpg,cat,train\nb.jpg,dog,train\n", r"has no val images"),
        (
            "a.jpg,cat,train\nb.jpg,dog,train\nc.jpg,fox,val\n",
            r"classes without train images \(fox\)",
        ),
    ],
)
def test_bad_labels_name_the_file_and_the_fix(tmp_path, rows, message):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_image(tmp_path / name)
    csv = tmp_path / "labels.csv"
    csv.write_text(rows)
    with pytest.raises(LabelError, match=message) as caught:
        read_labels(csv, tmp_path, EXTENSIONS)
    assert "labels.csv" in str(caught.value)


def test_a_tree_without_val_says_what_a_tree_holds(tmp_path):
    make_image(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(LabelError, match=r"has no val/ folder; a labelled tree holds train/"):
        read_labels(tmp_path, tmp_path, EXTENSIONS)
