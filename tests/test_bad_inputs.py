"""Inputs a careless or hostile user gives, on real files: each is refused in one line naming the file, row
or key, or handled as docs/troubleshooting.md says."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest

import training
from errors import UserError
from tests import files
from tests.helpers import in_child


def write_scene_csv(folder: Path, labels: list[str], splits: list[str] | None = None, paths=None) -> Path:
    """One 64x64 PNG and a 16x16 box per label (the boxes tile the image row by row)."""
    files.write_png(folder / "scene.png", files.random_image(np.random.default_rng(0), 64, 64))
    csv_path = folder / "crops.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label"] + (["split"] if splits else []))
        for i, label in enumerate(labels):
            y, x = divmod(i % 16, 4)
            path = paths[i] if paths else "scene.png"
            writer.writerow([path, x * 16, y * 16, x * 16 + 16, y * 16 + 16, label] + ([splits[i]] if splits else []))
    return csv_path


def test_labels_that_only_look_like_integers_are_names(build_crops, tmp_path):
    """'--5' and '²' passed the old digit test and then crashed int(); they are class names."""
    csv_path = write_scene_csv(tmp_path, ["--5", "²", "1"] * 4)
    assert build_crops(f"dataset.csv={csv_path}").classes == ["--5", "1", "²"]
    numbers = write_scene_csv(tmp_path / "numbers", ["10", "2", "-1"] * 4)
    assert build_crops(f"dataset.csv={numbers}").classes == ["-1", "2", "10"]  # still sorted as numbers


def test_a_csv_that_is_not_utf8_names_its_line(build_crops, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["cafe", "tea"] * 4)
    lines = csv_path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"cafe", "café".encode("latin-1"))
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match=r"crops.csv: line 4 is not UTF-8 \(byte 0xe9\): the crop CSV must be saved as UTF-8"):
        build_crops(f"dataset.csv={csv_path}")


def test_a_path_with_a_trailing_newline_is_a_bad_row_not_trimmed(build_crops, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["a", "b"] * 4, paths=["scene.png\n"] + ["scene.png"] * 7)
    with pytest.raises(UserError, match=r"1 bad row\(s\).*\n  line 3: scene.png: path 'scene.png\\n' holds a line break"):
        build_crops(f"dataset.csv={csv_path}")


def test_a_training_split_with_a_single_class_is_an_error(make_cfg, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["a"] * 6 + ["b"] * 2, splits=["train"] * 6 + ["val"] * 2)
    with pytest.raises(UserError, match=r"training split holds only class \['a'\] of \['a', 'b'\]"):
        training.run(make_cfg(f"dataset.csv={csv_path}"))


def test_a_class_only_in_validation_is_warned_about(make_cfg, tmp_path, caplog):
    csv_path = write_scene_csv(tmp_path, ["a", "b"] * 4 + ["c"], splits=["train"] * 8 + ["val"])
    training.run(make_cfg(f"dataset.csv={csv_path}"))
    assert "class(es) ['c'] have validation items but no training items" in caplog.text


@pytest.mark.parametrize("family, suffix", [("imagefolder", ".png"), ("datasetfolder", ".npy")])
def test_a_folder_symlink_leaving_the_root_is_refused(make_cfg, tmp_path, family, suffix):
    root, outside = tmp_path / "root", tmp_path / "outside"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(3):
            item = root / name / f"{i}{suffix}"
            if suffix == ".png":
                files.write_png(item, files.random_image(rng, 8, 8))
            else:
                files.write_npy(item, files.random_image(rng, 8, 8))
    secret = files.write_npy(outside / f"secret{suffix}", np.zeros((8, 8), np.uint8)) if suffix == ".npy" else \
        files.write_png(outside / f"secret{suffix}", np.zeros((8, 8), np.uint8))
    os.symlink(secret, root / "a" / f"link{suffix}")
    os.symlink(outside, root / "b" / "linked_folder")
    with pytest.raises(UserError, match=rf"2 file\(s\) resolve outside it.*allow_outside_root=true:\n.*link{suffix}"):
        training.run(make_cfg(f"dataset={family}", f"dataset.root={root}"))
    metrics = training.run(make_cfg(f"dataset={family}", f"dataset.root={root}", "dataset.allow_outside_root=true"))
    assert metrics["val/acc"] >= 0


def with_file_size_limit(n_bytes: int, body) -> None:
    """Run `body` where writes past `n_bytes` fail with EFBIG (Python ignores SIGXFSZ): the errors of a full
    disk without mounting one. The limit binds a whole process, pytest's own writes (its log, a redirected
    report) included, so it is set in a forked child that ends with the body (helpers.in_child)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        body()

    in_child(limited)


def test_a_disk_cache_that_cannot_be_written_is_one_line_and_leaves_no_temp_file(build_crops, crop_csv, tmp_path):
    cache = tmp_path / "cache"

    def build() -> None:  # the array is 64 x 3 x 64 x 64 = 786 kB
        with pytest.raises(UserError, match=r"dataset.cache_dir .*cache: cannot write the crop cache \(File too large\)"):
            build_crops(f"dataset.csv={crop_csv}", "dataset.cache=disk", "dataset.width=64", "dataset.height=64")

    with_file_size_limit(100_000, build)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # the empty build lock alone


def test_a_disk_cache_larger_than_the_free_space_is_refused_before_writing(build_crops, crop_csv, tmp_path):
    # 64 crops x 3 x 200000 x 200000 = 7.7 TB: more than this disk's free space and than the memory.
    with pytest.raises(UserError, match=r"needs 7\d{3}\.\d GiB on disk but .* GiB free: set dataset.cache=none"):
        build_crops(f"dataset.csv={crop_csv}", "dataset.cache=disk", "dataset.width=200000", "dataset.height=200000")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # the empty build lock alone
    with pytest.raises(UserError, match=r"needs 7\d{3}\.\d GiB in memory .* set dataset.cache=none"):
        build_crops(f"dataset.csv={crop_csv}", "dataset.width=200000", "dataset.height=200000")


def test_a_cache_dir_that_cannot_be_created_is_one_line(build_crops, crop_csv, tmp_path):
    """A read-only folder would do, but tests may run as root, for whom chmod stops nothing: a file in the
    way fails the same mkdir."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"dataset.cache_dir .*a_file/cache: cannot create it \(Not a directory\)"):
        build_crops(f"dataset.csv={crop_csv}", "dataset.cache=disk", f"dataset.cache_dir={tmp_path / 'a_file' / 'cache'}")


def test_a_checkpoint_that_cannot_be_saved_is_one_line(tmp_path):
    import torch

    from training import checkpoint as checkpoints

    path = tmp_path / "checkpoints" / "last.pt"

    def save() -> None:
        with pytest.raises(UserError, match=r"cannot save .*last.pt \(.*\); no checkpoint was saved") as error:
            checkpoints.save({"model": torch.zeros(100_000)}, path)  # 400 kB
        assert "\n" not in str(error.value) and list(path.parent.iterdir()) == []
        checkpoints.save({"model": torch.zeros(10)}, path)
        before = path.read_bytes()
        with pytest.raises(UserError, match=r"the previous one is kept"):
            checkpoints.save({"model": torch.zeros(100_000)}, path)
        assert path.read_bytes() == before and list(path.parent.iterdir()) == [path]

    with_file_size_limit(50_000, save)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(build_crops, make_cfg, make_eval_cfg, tmp_path):
    """A small PNG that claims 3000x3000 pixels, against a limit of 1000000 (the default is PIL's 89M)."""
    from datasets.base import limit_image_pixels
    from commands.evaluation import run_evaluation

    big = np.zeros((3000, 3000), np.uint8)
    csv_path = write_scene_csv(tmp_path, ["a", "b"] * 4, paths=["big.png"] * 8)
    files.write_png(tmp_path / "big.png", big)
    assert (tmp_path / "big.png").stat().st_size < 50_000
    try:
        limit_image_pixels(1_000_000)
        with pytest.raises(UserError, match=r"big.png: unreadable \(it has more than max_image_pixels=1000000 "
                                            r"pixels .*raise max_image_pixels=N"):
            build_crops(f"dataset.csv={csv_path}")
    finally:
        limit_image_pixels(89478485)
    run = make_cfg(f"dataset.csv={write_scene_csv(tmp_path / 'small', ['a', 'b'] * 4)}", run_dir=tmp_path / "run")
    training.run(run)
    try:
        with pytest.raises(UserError, match=r"predict: cannot read .*big.png .*more than max_image_pixels=1000000"):
            run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run/checkpoints/last.pt'}",
                                         f"predict=[{tmp_path / 'big.png'}]", "max_image_pixels=1000000"))
    finally:  # PIL's limit is process-wide: later tests in this worker get the default back whatever happened
        limit_image_pixels(89478485)


def test_a_run_folder_file_that_cannot_be_written_is_one_line_and_keeps_the_previous(tmp_path):
    from training import run_folder

    path = tmp_path / "metrics.json"
    run_folder.write_text(path, "{}")

    def write() -> None:
        with pytest.raises(UserError, match=r"cannot write .*metrics.json \(File too large\); the previous one is kept"):
            run_folder.write_text(path, "x" * 5000)

    with_file_size_limit(1000, write)
    assert path.read_text() == "{}" and list(tmp_path.iterdir()) == [path]  # whole, and no temp file left


def test_tensorboard_events_that_cannot_be_written_are_one_line(make_cfg, crop_csv, tmp_path, capfd):
    """The first batch's image alone takes the event file past 20 kB; config.yaml and train.log stay below."""
    import training

    def train() -> None:
        with pytest.raises(UserError, match=r"cannot write TensorBoard events to .*run \(File too large\)") as error:
            training.run(make_cfg(f"dataset.csv={crop_csv}", "trainer.epochs=3"))
        assert "\n" not in str(error.value)

    with_file_size_limit(20_000, train)
    assert "Traceback" not in capfd.readouterr().err  # nor from the event writer's own thread


def test_a_train_log_that_cannot_be_written_is_one_line_not_a_traceback_per_line(make_cfg, crop_csv, tmp_path,
                                                                                 capfd):
    """train.log outgrows a 300-byte limit at its second line, before config.yaml (larger) is written:
    logging would print '--- Logging error ---' and a traceback for every later line."""
    import training

    def train() -> None:
        with pytest.raises(UserError, match=r"cannot write .*config.yaml \(File too large\)"):
            training.run(make_cfg(f"dataset.csv={crop_csv}", run_dir=tmp_path / "run"))

    with_file_size_limit(300, train)
    err = capfd.readouterr().err
    assert err.count(f"cannot write {tmp_path / 'run' / 'train.log'} (File too large)") == 1, err
    assert "Logging error" not in err and "Traceback" not in err
