"""Few-shot image data: Omniglot / miniImageNet loaders, the paper and Vinyals splits, and the N-way K-shot sampler."""

from __future__ import annotations

import csv
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hbmeta.tasks.data import (default_data_root, load_miniimagenet, load_omniglot, load_omniglot_folder,
                         omniglot_classes)
from hbmeta.tasks.fewshot import FewShotBatch, FewShotTasks, miniimagenet_tasks, omniglot_tasks

DATA = default_data_root()
OMNIGLOT = DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(not (OMNIGLOT / "images_background.npz").is_file(),
                                    reason=f"Omniglot npz files not found under {OMNIGLOT}; set HBMETA_DATA")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hbmeta-cache")


@pytest.fixture(scope="session")
def omniglot(omniglot_cache):
    """The real Omniglot, loaded once (from the npz, into a fresh cache) for the whole session."""
    if not (OMNIGLOT / "images_background.npz").is_file():
        pytest.skip(f"Omniglot npz files not found under {OMNIGLOT}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HBMETA_CACHE", str(omniglot_cache))
        return load_omniglot(DATA)


@pytest.fixture(scope="session")
def paper(omniglot):
    images, names = omniglot
    return {part: omniglot_classes(images, names, "paper", part, seed=0) for part in ("train", "test")}


def coded_classes(num_classes: int, per_class: int) -> torch.Tensor:
    """``[C, n, 1, 2, 2]`` whose pixels all hold ``class * per_class + drawer``, so a sampled image tells its origin."""
    return torch.arange(num_classes * per_class, dtype=torch.float32).view(num_classes, per_class, 1, 1, 1).expand(
        num_classes, per_class, 1, 2, 2).clone()


# --------------------------------------------------------------------------- Omniglot loader


@needs_omniglot
def test_load_omniglot_gives_1623_characters_of_20_drawers_at_28px_with_ink_255(omniglot):
    images, names = omniglot
    assert images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    assert names[0] == "Arcadian/character01" and names[964] == "Angelic/character01" and names[-1] == "ULOG/character26"
    assert len(set(names)) == 1623
    mean_ink = images.float().mean() / 255
    assert 0.02 < mean_ink < 0.3, "the background must be 0 and the (thin) strokes 255"
    assert images.max() == 255 and (images[:, :, 0, :] == 0).float().mean() > 0.95  # border rows are background


@needs_omniglot
def test_second_omniglot_load_comes_from_the_atomic_cache(omniglot, omniglot_cache, monkeypatch):
    monkeypatch.setenv("HBMETA_CACHE", str(omniglot_cache))
    assert [p.suffix for p in omniglot_cache.iterdir()] == [".pt"]  # no temporary file left behind
    start = time.perf_counter()
    images, names = load_omniglot(DATA)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(images, omniglot[0]) and names == omniglot[1]


@needs_omniglot
def test_folder_loader_reads_the_original_png_layout_identically_to_the_npz(omniglot, tmp_path):
    wanted = {"images_background": ("Arcadian/character01", "Arcadian/character02", "Alphabet_of_the_Magi/character01"),
              "images_evaluation": ("Angelic/character01",)}
    for part, chars in wanted.items():
        with zipfile.ZipFile(OMNIGLOT / f"{part}_from_npz.zip") as zf:
            zf.extractall(tmp_path, [n for n in zf.namelist() if n.endswith(".png") and n.split("/", 1)[1].rsplit("/", 1)[0] in chars])
    images, names = load_omniglot_folder(tmp_path)
    assert names == ["Arcadian/character01", "Arcadian/character02", "Alphabet_of_the_Magi/character01", "Angelic/character01"]
    assert torch.equal(images, omniglot[0][[0, 1, 708, 964]])


def write_png_omniglot(folder: Path) -> None:
    """2 alphabets x 2 characters x 20 drawers of 105x105 1-bit PNGs; drawer d of character c is a black square."""
    from PIL import Image

    for a, alphabet in enumerate(("Zeta", "Alpha")):
        for c in range(2):
            char_dir = folder / alphabet / f"character{c + 1:02d}"
            char_dir.mkdir(parents=True)
            cid = 2 * a + c + 1
            for d in range(20):
                img = np.ones((105, 105), dtype=bool)
                img[4 * d:4 * d + 15, 30 * c:30 * c + 15] = False
                Image.fromarray(img).save(char_dir / f"{cid:04d}_{d + 1:02d}.png")


def test_folder_loader_on_generated_pngs_orders_by_character_id_and_marks_ink_255(tmp_path):
    write_png_omniglot(tmp_path)
    images, names = load_omniglot_folder(tmp_path, image_size=105)
    assert images.shape == (4, 20, 105, 105) and images.dtype == torch.uint8
    assert names == ["Zeta/character01", "Zeta/character02", "Alpha/character01", "Alpha/character02"]
    assert images.sum().item() == 4 * 20 * 15 * 15 * 255
    assert images[1, 3, 12:27, 30:45].eq(255).all()
    small, _ = load_omniglot_folder(tmp_path)
    assert small.shape == (4, 20, 28, 28)
    assert small.float().sum().div(255).item() == pytest.approx(4 * 20 * 225 * (28 / 105) ** 2, rel=1e-3)


def test_folder_loader_rejects_characters_with_different_drawer_counts(tmp_path):
    write_png_omniglot(tmp_path)
    next((tmp_path / "Alpha" / "character01").glob("*.png")).unlink()
    with pytest.raises(ValueError, match=r"different numbers of drawers \[19, 20\]"):
        load_omniglot_folder(tmp_path)


# --------------------------------------------------------------------------- splits


@needs_omniglot
def test_rotation_classes_are_exactly_rot90_of_the_base_character(omniglot, paper):
    base = omniglot[0]
    split = paper["train"]
    assert split.images.shape == (4800, 20, 1, 28, 28) and split.images.dtype == torch.float32
    assert torch.equal(torch.bincount(split.characters, minlength=1623)[split.characters.unique()],
                       torch.full((1200,), 4))
    for k in range(4):
        mask = split.rotations == 90 * k
        assert mask.sum() == 1200
        expected = torch.rot90(base[split.characters[mask]], k, dims=(-2, -1)).float() / 255
        assert torch.equal(split.images[mask, :, 0], expected)
    assert split.names[1] == f"{omniglot[1][split.characters[1]]}/rot090"


@needs_omniglot
def test_paper_split_is_1200_train_and_423_test_characters_disjoint_and_seeded(omniglot, paper):
    train, test = paper["train"].characters.unique(), paper["test"].characters.unique()
    assert (train.numel(), test.numel()) == (1200, 423)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(1623))
    assert paper["test"].images.shape == (1692, 20, 1, 28, 28)
    alphabets = {omniglot[1][c].split("/")[0] for c in test.tolist()}
    assert len(alphabets) > 40, "irrespective of the alphabet: test characters come from (nearly) every alphabet"
    other = omniglot_classes(*omniglot, "paper", "test", seed=1, dtype=torch.uint8)
    assert not torch.equal(other.characters.unique(), test)
    again = omniglot_classes(*omniglot, "paper", "test", seed=0, dtype=torch.uint8)
    assert torch.equal(again.characters, paper["test"].characters)
    assert torch.equal(again.images.float() / 255, paper["test"].images)


@needs_omniglot
def test_paper_splits_validation_part_is_held_out_of_subtrain_and_inside_train(omniglot):
    parts = {p: set(omniglot_classes(*omniglot, "paper", p, dtype=torch.uint8).characters.tolist())
             for p in ("train", "test", "subtrain", "val")}
    assert (len(parts["subtrain"]), len(parts["val"])) == (1100, 100)
    assert parts["subtrain"] | parts["val"] == parts["train"] and not parts["subtrain"] & parts["val"]
    assert not parts["val"] & parts["test"]
    with pytest.raises(ValueError, match="paper split .* has parts 'train'.*'test'.*'subtrain' and 'val'.*got part='dev'"):
        omniglot_classes(*omniglot, "paper", "dev")


@needs_omniglot
def test_vinyals_split_has_1028_172_423_characters_times_4_rotations_and_is_disjoint(omniglot):
    parts = {p: omniglot_classes(*omniglot, "vinyals", p, root=DATA, dtype=torch.uint8) for p in ("train", "val", "test")}
    chars = {p: set(s.characters.tolist()) for p, s in parts.items()}
    assert {p: len(c) for p, c in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    assert {p: s.num_classes for p, s in parts.items()} == {"train": 4112, "val": 688, "test": 1692}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    lines = (OMNIGLOT / "splits" / "vinyals" / "val.txt").read_text().split()
    assert parts["val"].names == lines
    with pytest.raises(ValueError, match="unknown Omniglot split 'lake'"):
        omniglot_classes(*omniglot, "lake", "train")


# --------------------------------------------------------------------------- task sampler


@needs_omniglot
def test_train_and_test_tasks_never_share_a_character(paper):
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for part, split in paper.items():
        tasks = FewShotTasks(split.images, ways=20, shots=1, queries=5)
        seen[part] = set(split.characters[tasks.sample(200, gen).classes].unique().tolist())
        assert seen[part] <= set(split.characters.tolist())
    assert len(seen["test"]) > 300 and not seen["train"] & seen["test"]


@needs_omniglot
def test_omniglot_tasks_builds_20_way_tasks_of_28px_images_in_0_1(omniglot_cache, monkeypatch):
    monkeypatch.setenv("HBMETA_CACHE", str(omniglot_cache))
    tasks = omniglot_tasks(20, 5, 15, part="test", root=DATA)
    assert tasks.num_classes == 1692 and tasks.classes.dtype == torch.uint8 and len(tasks.class_names) == 1692
    batch = tasks.sample(4, torch.Generator().manual_seed(0))
    assert batch.x_train.shape == (4, 100, 1, 28, 28) and batch.x_val.shape == (4, 300, 1, 28, 28)
    assert batch.x_train.dtype == torch.float32 and 0 <= batch.x_train.min() and batch.x_train.max() == 1


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 15), (3, 2, 1)])
def test_labels_are_0_to_ways_minus_1_each_shots_and_queries_times_from_distinct_drawers(ways, shots, queries):
    per_class = 20
    tasks = FewShotTasks(coded_classes(25, per_class), ways, shots, queries)
    batch = tasks.sample(64, torch.Generator().manual_seed(1))
    assert isinstance(batch, FewShotBatch)
    assert batch.x_train.shape == (64, ways * shots, 1, 2, 2) and batch.x_val.shape == (64, ways * queries, 1, 2, 2)
    assert batch.y_train.dtype == torch.int64 and batch.classes.shape == (64, ways)
    for y, count in ((batch.y_train, shots), (batch.y_val, queries)):
        assert torch.equal(torch.stack([torch.bincount(row, minlength=ways) for row in y]), torch.full((64, ways), count))
    for t in range(64):
        assert batch.classes[t].unique().numel() == ways
        code = torch.cat([batch.x_train[t, :, 0, 0, 0], batch.x_val[t, :, 0, 0, 0]]).long()
        labels = torch.cat([batch.y_train[t], batch.y_val[t]])
        assert torch.equal(code // per_class, batch.classes[t][labels]), "an image's class is the class of its label"
        assert code.unique().numel() == code.numel(), "support and query images are distinct drawers"


def test_class_to_label_assignment_is_a_fresh_random_permutation_per_task():
    batch = FewShotTasks(coded_classes(5, 20), ways=5, shots=1, queries=1).sample(2000, torch.Generator().manual_seed(2))
    orders = {tuple(row) for row in batch.classes.tolist()}
    assert len(orders) == 120, "all 5! label assignments occur"
    assert (batch.classes[:, 0] == 0).float().mean().item() == pytest.approx(0.2, abs=0.03)


def test_same_seeded_generator_gives_the_same_batch_and_leaves_the_global_rng_alone():
    tasks = FewShotTasks(coded_classes(30, 20), ways=5, shots=2, queries=3)
    state = torch.get_rng_state()
    a, b = (tasks.sample(8, torch.Generator().manual_seed(7)) for _ in range(2))
    c = tasks.sample(8, torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("x_train", "y_train", "x_val", "y_val", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)


def test_k_query_overrides_queries_per_class_and_select_keeps_classes():
    tasks = FewShotTasks(coded_classes(10, 20).to(torch.uint8), ways=4, shots=1, queries=2)
    batch = tasks.sample(6, torch.Generator().manual_seed(0), k_query=19)
    assert batch.x_val.shape[1] == 4 * 19 and batch.x_train.max() <= 1
    part = batch.select(torch.tensor([1, 4]))
    assert torch.equal(part.classes, batch.classes[[1, 4]]) and torch.equal(part.x_val, batch.x_val[[1, 4]])
    assert batch.select(slice(0, 3)).classes.shape == (3, 4)
    assert batch.to("cpu") is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_moves_images_and_labels_but_keeps_classes_on_the_cpu():
    batch = FewShotTasks(coded_classes(10, 20), ways=5).sample(2).to("cuda")
    assert batch.x_train.is_cuda and batch.y_val.is_cuda and batch.classes.device.type == "cpu"
    assert batch.select(torch.tensor([1], device="cuda")).classes.shape == (1, 5)


@pytest.mark.parametrize("kwargs,message", [
    ({"ways": 11}, r"ways=11 exceeds the 10 classes"),
    ({"shots": 1, "queries": 20}, r"shots \+ queries = 1 \+ 20 = 21 exceeds the 20 examples per class"),
    ({"ways": 0}, r"ways, shots and queries must be >= 1; got ways=0"),
])
def test_bad_ways_shots_or_queries_raise_value_error_naming_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FewShotTasks(coded_classes(10, 20), **kwargs)


def test_too_many_queries_at_sample_time_raise_value_error():
    with pytest.raises(ValueError, match=r"5 \+ 16 = 21 exceeds the 20"):
        FewShotTasks(coded_classes(10, 20), shots=5).sample(2, k_query=16)


# --------------------------------------------------------------------------- data root and errors


def test_missing_omniglot_raises_file_not_found_naming_the_path_and_how_to_point_at_data(tmp_path):
    expected = tmp_path / "nowhere" / "omniglot" / "images_background.npz"
    for call in (lambda: load_omniglot(tmp_path / "nowhere"), lambda: omniglot_tasks(root=tmp_path / "nowhere")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert str(expected) in str(err.value) and "--data-root" in str(err.value) and "HBMETA_DATA" in str(err.value)
    with pytest.raises(FileNotFoundError, match="Omniglot image folder not found"):
        load_omniglot_folder(tmp_path / "nowhere")


def test_default_data_root_is_hbmeta_data_then_shared_data_beside_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HBMETA_DATA", str(tmp_path / "mine"))
    assert default_data_root() == tmp_path / "mine"
    monkeypatch.delenv("HBMETA_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()


# --------------------------------------------------------------------------- miniImageNet


COLORS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def write_tiny_miniimagenet(root: Path, per_class: int = 4) -> None:
    """3 classes x ``per_class`` solid-colour 10x12 JPEGs in ``root/images`` and their ``train.csv`` beside it."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = []
    for label, color in COLORS.items():
        for i in range(per_class):
            name = f"{label}{i:08d}.jpg"
            Image.new("RGB", (12, 10), color).save(root / "images" / name, quality=95)
            rows.append((name, label))
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])


def test_miniimagenet_loader_resizes_tiny_jpegs_to_84px_class_major_and_caches(tmp_path):
    write_tiny_miniimagenet(tmp_path / "mini")
    images, labels = load_miniimagenet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")
    assert images.shape == (3, 4, 3, 84, 84) and images.dtype == torch.uint8 and labels == list(COLORS)
    for c, color in enumerate(COLORS.values()):
        assert (images[c].float().mean((0, 2, 3)) - torch.tensor(color)).abs().max() < 4
    assert len(list((tmp_path / "cache").glob("miniimagenet_train_84px_*.pt"))) == 1
    again, _ = load_miniimagenet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")
    assert torch.equal(again, images)
    tasks = miniimagenet_tasks(3, 1, 3, part="train", root=tmp_path / "mini", cache_dir=tmp_path / "cache")
    batch = tasks.sample(2, torch.Generator().manual_seed(0))
    assert batch.x_train.shape == (2, 3, 3, 84, 84) and batch.x_val.shape == (2, 9, 3, 84, 84)


def test_miniimagenet_reads_split_csvs_from_csv_root_and_needs_per_class_for_unequal_classes(tmp_path):
    write_tiny_miniimagenet(tmp_path / "mini")
    splits = tmp_path / "splits"
    splits.mkdir()
    rows = list(csv.reader((tmp_path / "mini" / "train.csv").read_text().splitlines()))
    with open(splits / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[:1] + rows[1:8])  # n01 x 4, n02 x 3
    with pytest.raises(ValueError, match=r"different numbers of images \[3, 4\]"):
        load_miniimagenet(tmp_path / "mini", "val", csv_root=splits, cache_dir=tmp_path / "cache")
    images, labels = load_miniimagenet(tmp_path / "mini", "val", csv_root=splits, per_class=3, image_size=16,
                                       cache_dir=tmp_path / "cache")
    assert images.shape == (2, 3, 3, 16, 16) and labels == ["n01", "n02"]


def test_miniimagenet_without_images_says_where_and_that_imagenet_is_not_shipped(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_miniimagenet(tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path / "images") in msg and "not redistributable" in msg and "HBMETA_DATA" in msg
    write_tiny_miniimagenet(tmp_path / "mini")
    (tmp_path / "mini" / "images" / "n0200000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 12 listed.*n0200000002\.jpg"):
        load_miniimagenet(tmp_path / "mini", "train", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown miniImageNet split 'dev'"):
        load_miniimagenet(tmp_path / "mini", "dev")
