"""dataset.split_by, folds and group_pattern on real CSVs and PNGs: no validation crop shares pixels with a
training crop under file or region, the log says which rule and why, row is the split runs drew before,
folds partition the units, and a run's checkpoint makes a resume and evaluate.py draw the same split."""

import logging

import numpy as np
import pytest
import torch

import training
from commands.evaluation import run_evaluation
from datasets import splits
from datasets.crop_csv import write_crops
from datasets.folders import build_imagefolder
from errors import UserError
from tests import files

CLASSES = ("ant", "bee", "cow")


def write_photos(root, files_per_class=1, boxes=60, side=128, seed=0, split=None):
    """One noise PNG (side x side) per class and file, `boxes` random squares of 12-24 px on each; a crop CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        for n in range(files_per_class):
            name = f"{label}{n}.png"
            files.write_png(root / name, files.random_image(rng, side, side))
            for _ in range(boxes):
                s = int(rng.integers(12, 25))
                x0, y0 = (int(v) for v in rng.integers(0, side - s + 1, size=2))
                row = dict(path=name, x0=x0, y0=y0, x1=x0 + s, y1=y0 + s, label=label)
                if split is not None:
                    row["split"] = split(len(rows))
                rows.append(row)
    return write_crops(root / "crops.csv", rows), rows


def build(csv, **keys):
    return files.build_crops(csv, **{"val_fraction": 0.2, "split_by": "auto", **keys})


def sides(bundle):
    return bundle.train.indices.numpy(), bundle.val.indices.numpy()


def overlaps(rows, a, b):
    """Items of `a` sharing pixels with any item of `b` in the same file (brute force)."""
    def meets(p, q):
        return (p["path"] == q["path"] and p["x0"] < q["x1"] and q["x0"] < p["x1"] and p["y0"] < q["y1"]
                and q["y0"] < p["y1"])
    return {i for i in a if any(meets(rows[i], rows[j]) for j in b)}


def test_one_photo_per_class_is_split_by_region_without_shared_pixels(tmp_path, caplog):
    csv, rows = write_photos(tmp_path)
    with caplog.at_level(logging.INFO):
        bundle = build(csv)
    train, val = sides(bundle)
    assert bundle.split["by"] == "region"
    assert "split: region (split_by=auto: region, class 'ant' has crops from 1 of its source files only" in caplog.text
    assert not overlaps(rows, train, val)
    assert bundle.split["left_out"] == len(rows) - len(train) - len(val) > 0
    assert f"{bundle.split['left_out']} training item(s) left out" in caplog.text
    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    assert set(labels[train]) == set(labels[val]) == {0, 1, 2}
    assert 0.1 < len(val) / len(rows) < 0.35


def test_region_validation_takes_several_blocks_of_each_photo(tmp_path):
    """One block a photo is one kind of content; validation takes about VAL_BLOCKS of them (blocks allowing)."""
    csv, rows = write_photos(tmp_path, boxes=150, side=384)
    boxes = np.array([[r["x0"], r["y0"], r["x1"], r["y1"]] for r in rows])
    photo = np.array([CLASSES.index(r["label"]) for r in rows])
    blocks = splits.region_blocks(boxes, photo, 0.2)
    assert all(len(np.unique(blocks[photo == c])) >= 4 * 5 for c in range(3))  # 384 px: 5 x 5 blocks of ~77 px
    _, val = sides(build(csv))
    held = [len(np.unique(blocks[val][photo[val] == c])) for c in range(3)]
    assert all(3 <= n <= 6 for n in held), held
    one = splits.region_blocks(boxes, photo, 0.2, val_blocks=1)  # the rule before: one block of ~5 a photo
    assert all(len(np.unique(one[photo == c])) in (5, 6) for c in range(3))
    _, val_one = sides(build(csv, region_val_blocks=1))
    held_one = [len(np.unique(one[val_one][photo[val_one] == c])) for c in range(3)]
    assert max(held_one) <= 2 and sum(held_one) < sum(held), (held_one, held)


def test_a_region_checkpoint_from_before_val_blocks_builds_its_one_block_split(tmp_path):
    """A checkpoint whose region split has no val_blocks (made with one block a file) gets that split back
    when resumed or scored; a new checkpoint records val_blocks."""
    from tests.conftest import compose_train
    from training.build import build_dataset, check_same_split, saved_mapping

    csv, _ = write_photos(tmp_path, boxes=150, side=384)
    cfg = compose_train(tmp_path / "run", f"dataset.csv={csv}", "dataset.split_by=auto", "dataset.width=16",
                        "dataset.height=16")
    old = build_dataset(cfg.dataset, 0, {"region_val_blocks": 1}).split
    new = build_dataset(cfg.dataset, 0).split
    assert new["val_blocks"] == 4 and old["val_digest"] != new["val_digest"]
    checkpoint = {"normalization": {"mean": [0.5], "std": [0.5]},
                  "split": {k: v for k, v in old.items() if k != "val_blocks"}}
    rebuilt = build_dataset(cfg.dataset, 0, saved_mapping(checkpoint, cfg.dataset))
    assert rebuilt.split["val_digest"] == old["val_digest"]
    check_same_split(checkpoint, rebuilt, "resume=old.pt")  # no error: the same items
    with pytest.raises(UserError, match="split by region, but its data now splits"):
        check_same_split(checkpoint, build_dataset(cfg.dataset, 0), "resume=old.pt")


def test_several_files_per_class_are_split_by_file_and_kept_whole(tmp_path, caplog):
    csv, rows = write_photos(tmp_path, files_per_class=5, boxes=20)
    with caplog.at_level(logging.INFO):
        bundle = build(csv)
    train, val = sides(bundle)
    assert bundle.split["by"] == "file" and bundle.split["left_out"] == 0
    assert "split_by=auto: file, every class has items in at least 2 source files (15 in all)" in caplog.text
    train_files, val_files = {rows[i]["path"] for i in train}, {rows[i]["path"] for i in val}
    assert not train_files & val_files and len(train) + len(val) == len(rows)
    assert {p[:3] for p in val_files} == set(CLASSES) and len(val_files) == 3  # one of 5 files per class


def test_row_is_the_earlier_split_and_warns_with_the_overlap_count(tmp_path, caplog):
    csv, rows = write_photos(tmp_path)
    with caplog.at_level(logging.INFO):
        bundle = build(csv, split_by="row")
    train, val = sides(bundle)
    labels = [CLASSES.index(r["label"]) for r in rows]
    expected_train, expected_val = splits.stratified(labels, 0.2, 0)
    assert np.array_equal(train, expected_train) and np.array_equal(val, expected_val)
    count = len(overlaps(rows, train, val))
    assert count > 0
    assert f"split_by=row leaves {count} training crop(s) overlapping validation crops" in caplog.text


@pytest.mark.parametrize("by", ["row", "file", "region"])
def test_folds_partition_the_items(tmp_path, by):
    csv, rows = write_photos(tmp_path, files_per_class=3 if by == "file" else 1, boxes=30)
    vals = []
    for fold in range(3):
        bundle = build(csv, split_by=by, folds=3, fold=fold)
        train, val = sides(bundle)
        assert bundle.split["by"] == by and bundle.split["fold"] == fold and bundle.split["folds"] == 3
        assert not set(train) & set(val)
        if by != "row":
            assert not overlaps(rows, train, val)
        vals.append(set(val.tolist()))
    assert sum(map(len, vals)) == len(rows) and set().union(*vals) == set(range(len(rows)))
    if by == "file":  # each file validates in exactly one fold
        for val in vals:
            assert len({rows[i]["path"] for i in val}) == 3


def test_split_column_rows_keep_their_side_in_every_mode(tmp_path):
    csv, rows = write_photos(tmp_path, split=lambda i: ("train", "val", "")[i % 3])
    for by in ("row", "region", "auto"):
        train, val = sides(build(csv, split_by=by))
        assert {i for i in range(len(rows)) if rows[i]["split"] == "train"} <= set(train)
        assert {i for i in range(len(rows)) if rows[i]["split"] == "val"} <= set(val)


def test_every_row_split_by_its_column_is_given(tmp_path, caplog):
    csv, _ = write_photos(tmp_path, split=lambda i: ("train", "val")[i % 2])
    with caplog.at_level(logging.INFO):
        assert build(csv).split["by"] == "given"
    assert "split: given (every item brings its own split)" in caplog.text
    with pytest.raises(UserError, match="nothing to fold"):
        build(csv, fold=1)


def test_disk_cache_gives_the_same_region_split(tmp_path):
    csv, _ = write_photos(tmp_path)
    memory = build(csv)
    for _ in range(2):  # writing the cache, then reading it (boxes from the manifest)
        disk = build(csv, cache="disk", cache_dir=str(tmp_path / "cache"))
        assert disk.split == memory.split
        assert torch.equal(disk.val.indices, memory.val.indices)


@pytest.fixture
def patients(tmp_path):
    """An image folder whose file names start with a patient ID; a patient has files in both classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("sick", "well"):
        for patient in range(6):
            for shot in range(3):
                files.write_png(root / cls / f"p{patient}_{shot}.png", files.random_image(rng, 12, 12))
    return root


def folder(root, **keys):
    args = dict(root=str(root), width=8, height=8, channels=3, cache="memory", val_fraction=0.25, mean=[0.5],
                std=[0.5], seed=0)
    return build_imagefolder(**{**args, **keys})


def test_a_group_pattern_keeps_a_folders_groups_whole(patients, caplog):
    with caplog.at_level(logging.INFO):
        bundle = folder(patients, split_by="file", group_pattern=r"^(p\d+)_")
    assert bundle.split["by"] == "file"
    assert "split_by=file over 6 groups of dataset.group_pattern" in caplog.text
    names = [path for path, _ in build_imagefolder.__globals__["ImageFolder"](str(patients)).samples]
    patient = [name.rsplit("/", 1)[1].split("_")[0] for name in names]
    train, val = sides(bundle)
    assert not {patient[i] for i in train} & {patient[i] for i in val}
    # Without a pattern a folder keeps its row split: each file is its own item.
    with caplog.at_level(logging.INFO):
        plain = folder(patients)
    assert plain.split["by"] == "row"
    assert "each file is its own item" in caplog.text


@pytest.mark.parametrize("keys, message", [
    (dict(split_by="file"), "dataset.split_by=file for .* needs dataset.group_pattern"),
    (dict(split_by="region"), "dataset.split_by=region needs crops"),
    (dict(split_by="file", group_pattern="^q"), r"dataset.group_pattern '\^q' matches no part of 36 file name\(s\) "
                                               r"\(e.g. 'p0_0.png'\)"),
    (dict(group_pattern="(p"), r"dataset.group_pattern '\(p' is not a regular expression"),
    (dict(fold=5), r"dataset.fold must be between 0 and 4 for dataset.folds=5"),
    (dict(split_by="sideways"), "dataset.split_by must be one of auto, file, region, row"),
])
def test_bad_split_keys_are_one_line(patients, keys, message):
    with pytest.raises(UserError, match=message) as e:
        folder(patients, **keys)
    assert "\n" not in str(e.value)


def test_a_file_split_of_a_one_file_class_is_one_line(tmp_path):
    csv, _ = write_photos(tmp_path)
    with pytest.raises(UserError, match="dataset.split_by=file: class 'ant' of .* has all its items in one of its "
                                        "source files") as e:
        build(csv, split_by="file")
    assert "\n" not in str(e.value)


def test_overlap_search_agrees_with_comparing_every_pair(monkeypatch):
    rng = np.random.default_rng(1)
    n = 300
    x0, y0 = rng.integers(0, 200, size=(2, n))
    side = rng.integers(1, 30, size=n)
    boxes = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
    files_of = rng.integers(0, 3, size=n)
    candidates, others = np.arange(0, 200), np.arange(200, n)
    monkeypatch.setattr(splits, "PAIRS_PER_CALL", 7)  # many small calls
    found = splits.overlapping(boxes, files_of, candidates, others)
    a, b = boxes[candidates][:, None], boxes[others][None]
    meets = ((a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
             & (files_of[candidates][:, None] == files_of[others][None]))
    assert np.array_equal(found, meets.any(axis=1)) and found.any() and not found.all()


@pytest.fixture(scope="module")
def region_run(tmp_path_factory):
    """One 2-epoch run on one photo per class (split by region), its data and its first epoch's checkpoint."""
    root = tmp_path_factory.mktemp("region-run")
    csv, rows = write_photos(root, boxes=40)
    from tests.conftest import compose_train
    with torch.random.fork_rng():
        metrics = training.run(compose_train(root / "run", f"dataset.csv={csv}", "dataset.split_by=auto", "trainer.epochs=2",
                                             "dataset.width=16", "dataset.height=16", "loader.batch_size=16"))
    return root, csv, rows, metrics


def test_a_checkpoint_records_its_split_and_evaluate_scores_those_items(region_run, make_eval_cfg, tmp_path):
    root, _, rows, metrics = region_run
    checkpoint = torch.load(root / "run" / "checkpoints" / "last.pt", weights_only=True)
    split = checkpoint["split"]
    assert split["by"] == "region" and split["train"] + split["val"] + split["left_out"] == len(rows)
    result = run_evaluation(make_eval_cfg(f"checkpoint={root / 'run' / 'checkpoints' / 'last.pt'}"))
    assert int(np.sum(result["confusion"])) == split["val"]
    assert result["acc"] == pytest.approx(metrics["val/acc"])


def test_a_resume_refuses_data_that_splits_otherwise(region_run, make_cfg, tmp_path):
    root, csv, rows, _ = region_run
    copy = tmp_path / "data"
    copy.mkdir()
    for path in root.glob("*.png"):
        (copy / path.name).write_bytes(path.read_bytes())
    write_crops(copy / "crops.csv", rows[:-5])  # five rows fewer: other blocks, other validation items
    last = root / "run" / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["config"]["dataset"]["csv"] = str(copy / "crops.csv")
    checkpoint["epoch"] = 1
    moved = tmp_path / "moved.pt"
    torch.save(checkpoint, moved)
    with pytest.raises(UserError, match=r"resume=.*moved.pt validated on \d+ items split by region, but its data "
                                        r"now splits into \d+ other ones") as e:
        training.run(make_cfg(f"resume={moved}", "trainer.epochs=2"))
    assert "\n" not in str(e.value)
