"""Dataset formats on disk: fake layouts built in tmp_path, plus cheap checks on the real copies."""
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils import datasets as ds
from utils import image_cache
from utils.datasets import DATASETS, FileImages, default_imagenet100_classes, describe_dataset, load_dataset
from utils.errors import ConfigError, DataError

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def save_image(path, size=(20, 20), colour=(200, 30, 40), mode="RGB", fmt=None):
    """Write a solid image of ``size`` (width, height) to ``path`` (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path, format=fmt)
    return path


def make_folder_tree(root, val_name="val"):
    """2 classes; train: 3 + 2 images (PNG/JPEG, various sizes, a greyscale one, upper-case
    extension, a sub-folder); val: 1 + 1. Plus files that are not images."""
    save_image(root / "train/cat/a.png", (40, 30))
    save_image(root / "train/cat/b.JPG", (30, 50), fmt="JPEG")
    save_image(root / "train/cat/sub/c.png", (24, 24), colour=(90, 0, 0), mode="L")
    save_image(root / "train/dog/d.jpeg", (64, 48), colour=(10, 200, 10), fmt="JPEG")
    save_image(root / "train/dog/e.bmp", (17, 33), colour=(10, 10, 250))
    (root / "train/dog/notes.txt").write_text("not an image")
    save_image(root / "train/dog/.hidden.png", (20, 20))
    save_image(root / f"{val_name}/cat/v1.png", (32, 32))
    save_image(root / f"{val_name}/dog/v2.webp", (32, 40), colour=(10, 200, 10), fmt="WEBP")
    return root


# ----------------------------------------------------------------------------------------------
# folder (ImageFolder tree)


def test_folder_loads_shapes_labels_and_order(tmp_path):
    root = make_folder_tree(tmp_path / "data")
    d = load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    assert d.class_names == ["cat", "dog"] and d.image_size == 16
    assert d.mean == DATASETS["folder"].mean
    assert d.train.images.shape == (5, 3, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.train.labels.tolist() == [0, 0, 0, 1, 1] and d.train.labels.dtype == torch.int64
    assert d.test.images.shape == (2, 3, 16, 16) and d.test.labels.tolist() == [0, 1]
    assert d.train.paths == sorted(d.train.paths) and d.train.boxes is None
    assert [Path(p).name for p in d.train.paths] == ["a.png", "b.JPG", "c.png", "d.jpeg", "e.bmp"]
    grey = d.train.images[2]  # greyscale -> 3 equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]) and grey[0, 8, 8] == 90
    assert d.train.images[4, :, 8, 8].tolist() == [10, 10, 250]


def test_folder_resizes_short_side_then_centre_crops(tmp_path):
    # 40x20 image: red | green | blue columns 0-9 | 10-29 | 30-39. Short side 20 -> 16 makes it
    # 32x16; the centre 16x16 crop is the green part (not a squashed view of all three).
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:30] = (0, 255, 0)
    img[:, 30:] = (0, 0, 255)
    (tmp_path / "train/a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "train/a/x.png")
    save_image(tmp_path / "train/b/y.png")
    save_image(tmp_path / "test/a/z.png")  # test/ when there is no val/
    with pytest.warns(UserWarning, match=r"1 class\(es\) have no images in .*test: b"):
        d = load_dataset("folder", str(tmp_path), image_size=16, progress=False, num_workers=0)
    x = d.train.images[0].int()
    assert (x[1, :, 1:15] >= 250).all() and (x[0, :, 1:15] <= 5).all() and (x[2, :, 1:15] <= 5).all()
    assert len(d.test) == 1


def test_folder_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("folder", str(missing), image_size=16)
    assert str(missing) in str(err.value) and "train/<class>/<image>" in str(err.value)
    with pytest.raises(DataError, match="needs data_root"):
        load_dataset("folder", None, image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="val/<class>/<image>"):
        describe_dataset("folder", str(tmp_path / "empty"))


def test_folder_unknown_val_class_and_empty_class_are_errors(tmp_path):
    root = make_folder_tree(tmp_path / "d1")
    save_image(root / "val/fox/f.png")
    with pytest.raises(DataError, match="fox"):
        describe_dataset("folder", str(root))
    root = make_folder_tree(tmp_path / "d2")
    (root / "train/empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        describe_dataset("folder", str(root))


def test_corrupt_image_raises_naming_file_or_is_skipped(tmp_path):
    root = make_folder_tree(tmp_path / "data")
    bad = root / "train/dog/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError) as err:
        load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    assert str(bad) in str(err.value) and "skip_unreadable" in str(err.value)
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable train image") as rec:
        d = load_dataset("folder", str(root), image_size=16, skip_unreadable=True, progress=False, num_workers=0)
    assert str(bad) in str(rec[0].message)
    assert len(d.train) == 5 and str(bad) not in d.train.paths
    assert d.train.labels.tolist() == [0, 0, 0, 1, 1]


def test_a_fifo_named_like_an_image_is_refused_when_listing(tmp_path):
    """A FIFO would block the decoder forever: refused naming it, before any decoding."""
    root = make_folder_tree(tmp_path / "data")
    (root / "train/dog/folder.jpg").mkdir()        # a folder named like an image is a folder
    assert describe_dataset("folder", str(root))["num_train"] == 5
    fifo = root / "train/dog/sub/z.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=rf"{fifo} is a FIFO \(named pipe\), not an image file"):
        describe_dataset("folder", str(root))
    fifo.unlink()
    os.symlink(tmp_path / "nowhere.jpg", root / "train/dog/broken.jpg")   # a broken link: decoding names it
    with pytest.raises(DataError, match=r"Cannot read image .*broken.jpg \(FileNotFoundError"):
        load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)


def test_food101_and_tinyimagenet_refuse_a_fifo_named_like_an_image(tmp_path):
    food = make_food(tmp_path / "food-101")
    os.mkfifo(food / "images/waffles/23.jpg")
    with pytest.raises(DataError, match="waffles/23.jpg is a FIFO"):
        describe_dataset("food101", str(food))
    tiny = make_tiny(tmp_path / "tiny")
    os.mkfifo(tiny / "val/images/val_9.JPEG")
    with pytest.raises(DataError, match="val_9.JPEG is a FIFO"):
        describe_dataset("tinyimagenet", str(tiny))


def test_links_are_followed_but_each_folder_is_listed_once(tmp_path):
    """``ln -s . loop`` in a class folder listed its images 41 times (os.walk follows a loop until
    the OS refuses); a link to a folder above is a loop too. A link to another folder still counts."""
    root = make_folder_tree(tmp_path / "data")
    os.symlink(".", root / "train/cat/loop")
    os.symlink(root / "train/cat/sub", root / "train/cat/again")   # the same folder twice: once
    assert describe_dataset("folder", str(root))["num_train"] == 5
    os.symlink("..", root / "train/cat/sub/up")   # (after: with two loops os.walk's 40 levels take years)
    assert describe_dataset("folder", str(root))["num_train"] == 5
    d = load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    assert [Path(p).relative_to(root).as_posix() for p in d.train.paths] == \
        ["train/cat/a.png", "train/cat/b.JPG", "train/cat/sub/c.png", "train/dog/d.jpeg", "train/dog/e.bmp"]
    save_image(tmp_path / "elsewhere/x.png")
    os.symlink(tmp_path / "elsewhere", root / "train/dog/more")
    assert describe_dataset("folder", str(root))["num_train"] == 6


def test_streamed_set_matches_in_memory_decoding(tmp_path):
    root = make_folder_tree(tmp_path / "data")
    mem = load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    streamed = load_dataset("folder", str(root), image_size=16, in_memory=False)
    assert streamed.train.images is None and streamed.train.paths == mem.train.paths
    assert torch.equal(streamed.train.labels, mem.train.labels)
    files = FileImages(streamed.train.paths, 16)
    assert len(files) == 5
    assert torch.equal(torch.stack([files[i] for i in range(len(files))]), mem.train.images)
    (root / "train/cat/a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="a.png"):
        files[0]


def test_decode_pool_gives_the_same_result_as_serial(tmp_path):
    paths = [str(save_image(tmp_path / f"{i}.png", (20 + i, 30), colour=(i * 10, 50, 100))) for i in range(10)]
    serial = image_cache.decode_images(paths, 16, workers=0, progress=False)
    pooled = image_cache.decode_images(paths, 16, workers=2, chunk_size=3, progress=False)
    for a, b in zip(serial[:3], pooled[:3]):
        np.testing.assert_array_equal(a, b)
    assert serial[0].shape == (10, 3, 16, 16) and serial[3] == []
    Path(paths[4]).write_bytes(b"broken")  # in the middle of the second chunk
    images, kept, _, failures = image_cache.decode_images(paths, 16, workers=2, chunk_size=3, progress=False,
                                                          skip_unreadable=True)
    assert kept.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9] and [f[0] for f in failures] == [paths[4]]
    np.testing.assert_array_equal(images, serial[0][kept])
    with pytest.raises(image_cache.DecodeFailure, match="4.png"):
        image_cache.decode_images(paths, 16, workers=2, chunk_size=3, progress=False)


def test_decode_pools_end_without_signalling_their_workers(tmp_path, monkeypatch):
    """A finished decode closes its pool (its workers leave on their own) instead of terminate(),
    and a worker ends on SIGTERM by the kernel's default action, never through the Python handler it
    inherits from main.py. With that handler and terminate(), about one pool in a few hundred hung
    for ever on teardown (a worker blocked on the task-queue lock that terminate() keeps; a sweep run
    stalled 15 minutes loading its data)."""
    import multiprocessing.pool
    import signal

    paths = [str(save_image(tmp_path / f"{i}.png", (12, 12))) for i in range(6)]
    terminated = []
    real = multiprocessing.pool.Pool.terminate
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", lambda self: (terminated.append(self), real(self)))
    image_cache.decode_images(paths, 8, workers=2, chunk_size=1, progress=False)
    assert terminated == []
    Path(paths[3]).write_bytes(b"broken")
    with pytest.raises(image_cache.DecodeFailure):   # an error still stops the workers at once
        image_cache.decode_images(paths, 8, workers=2, chunk_size=1, progress=False)
    assert len(terminated) == 1
    with multiprocessing.get_context().Pool(1, initializer=image_cache._decode_worker_init) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_describe_counts_without_decoding(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "data")
    monkeypatch.setattr(image_cache, "decode_image", _must_not_decode)
    assert describe_dataset("folder", str(root)) == {"num_classes": 2, "num_train": 5, "num_test": 2,
                                                     "class_names": ["cat", "dog"]}
    from utils import shapes
    assert describe_dataset("shapes", None, shapes={"num_classes": 4}) == \
        {"num_classes": 4, "num_train": 400, "num_test": 120, "class_names": shapes.class_names(4)}


def _must_not_decode(*args, **kwargs):
    raise AssertionError("decoded although it should not")


# ----------------------------------------------------------------------------------------------
# cache


def test_cache_second_load_skips_decoding_and_is_identical(tmp_path, monkeypatch):
    root, cache = make_folder_tree(tmp_path / "data"), tmp_path / "cache"
    first = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    with monkeypatch.context() as m:
        m.setattr(image_cache, "decode_images", _must_not_decode)
        second = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.paths == b.paths
    assert second.class_names == first.class_names
    # another image size or a changed file gives another cache entry (and decodes)
    load_dataset("folder", str(root), image_size=12, cache_dir=str(cache), progress=False, num_workers=0)
    save_image(root / "train/dog/new.png")
    third = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    assert len(third.train) == 6 and len(list(cache.iterdir())) == 3


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    root, cache = make_folder_tree(tmp_path / "data"), tmp_path / "cache"
    first = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="Ignoring unreadable dataset cache"):
        again = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    assert torch.equal(again.train.images, first.train.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: loads cleanly now
        load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)


def test_cache_key_of_a_utf8_path_is_unchanged(tmp_path):
    """Existing caches stay valid: the key is computed as it was before paths entered as bytes."""
    import hashlib
    import json

    files = [str(save_image(tmp_path / "a.png")), str(save_image(tmp_path / "caf\u00e9 \u732b.png"))]
    arrays = [np.arange(2)]
    h = hashlib.sha256()   # the key's recipe before: str paths encoded as UTF-8
    h.update(json.dumps({"dataset": "folder", "decoder": image_cache.DECODER_VERSION,
                         "format": image_cache.CACHE_FORMAT}, sort_keys=True).encode())
    for path in files:
        st = os.stat(path)
        h.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    h.update(f"\n{arrays[0].dtype}{arrays[0].shape}".encode())
    h.update(arrays[0].tobytes())
    assert image_cache.cache_key({"dataset": "folder"}, files, arrays) == h.hexdigest()


def test_cache_takes_a_file_name_that_is_not_utf8(tmp_path, monkeypatch):
    root, cache = make_folder_tree(tmp_path / "data"), tmp_path / "cache"
    odd = os.path.join(os.fsencode(root / "train/dog"), b"x\xff\xfe.png")   # valid image, name not UTF-8
    Image.new("RGB", (20, 20), (1, 2, 3)).save(odd, format="PNG")
    first = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    assert os.fsdecode(odd) in first.train.paths and len(first.train) == 6
    with monkeypatch.context() as m:
        m.setattr(image_cache, "decode_images", _must_not_decode)
        second = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False)
    assert torch.equal(first.train.images, second.train.images) and first.train.paths == second.train.paths


def test_cache_with_a_broken_link_names_it_as_without_cache(tmp_path):
    root, cache = make_folder_tree(tmp_path / "data"), tmp_path / "cache"
    link = root / "train/dog/zz.jpg"
    os.symlink(tmp_path / "nowhere.jpg", link)
    with pytest.raises(DataError) as uncached:
        load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    with pytest.raises(DataError) as cached:
        load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    assert str(cached.value) == str(uncached.value) and str(cached.value).startswith(f"Cannot read image {link} (")
    with pytest.warns(UserWarning, match="Skipped 1 unreadable train image"):
        d = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), skip_unreadable=True,
                         progress=False, num_workers=0)
    assert len(d.train) == 5
    save_image(tmp_path / "nowhere.jpg")   # the link leads to an image now: another key, decoded
    d = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), skip_unreadable=True,
                     progress=False, num_workers=0)
    assert len(d.train) == 6


# ----------------------------------------------------------------------------------------------
# CIFAR


def write_cifar(folder, files, label_key, n, num_classes, meta_name, names_key):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(n)  # red channel of the top-left pixel = index in the batch
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, label_key: [i % num_classes for i in range(n)],
                         b"filenames": [b"x.png"] * n}, fh)
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(num_classes)]}, fh)


def test_cifar10_in_official_subfolder(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                b"labels", 4, 10, "batches.meta", b"label_names")
    d = load_dataset("cifar10", str(tmp_path), image_size=32)
    assert d.class_names == [f"class{i}" for i in range(10)] and d.mean == (0.4914, 0.4822, 0.4465)
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    assert d.train.labels.tolist() == [0, 1, 2, 3] * 5 and d.train.paths is None and d.train.boxes is None
    assert d.train.images[:4, 0, 0, 0].tolist() == [0, 1, 2, 3]  # row-major [3, 32, 32] layout
    assert describe_dataset("cifar10", str(tmp_path)) == {"num_classes": 10, "num_train": 20, "num_test": 4,
                                                          "class_names": d.class_names}


def test_cifar100_in_root_and_resized(tmp_path):
    write_cifar(tmp_path, ["train", "test"], b"fine_labels", 6, 100, "meta", b"fine_label_names")
    d = load_dataset("cifar100", str(tmp_path), image_size=16)
    assert len(d.class_names) == 100 and d.std == (0.2675, 0.2565, 0.2761)
    assert d.train.images.shape == (6, 3, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.train.labels.tolist() == list(range(6))


def test_cifar_missing_or_malformed_files(tmp_path):
    with pytest.raises(DataError, match="data_batch_1") as err:
        load_dataset("cifar10", str(tmp_path), image_size=32)
    assert "cifar-10-batches-py" in str(err.value)
    write_cifar(tmp_path, ["train", "test"], b"fine_labels", 6, 100, "meta", b"fine_label_names")
    (tmp_path / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test"):
        load_dataset("cifar100", str(tmp_path), image_size=32)


@pytest.mark.parametrize("file, entry, value, why", [
    ("train", b"fine_labels", ["x"] * 6, "'fine_labels' must hold integer class indices, got values such as 'x'"),
    ("test", b"fine_labels", [0.5] * 6, "'fine_labels' must hold integer class indices, got values such as 0.5"),
    ("train", b"data", [[0] * 3072, [0] * 5] * 3, "'data' and 'fine_labels' must be arrays"),
    ("train", b"data", np.zeros((6, 32, 32, 3), dtype=np.uint8), r"'data' must be uint8 \[N, 3072\]"),
    ("meta", b"fine_label_names", 7, "the class names must be a list, got int"),
    ("meta", b"fine_label_names", [b"caf\xe9"] * 100, r"class name b'caf\\xe9' is not UTF-8 text"),
])
def test_cifar_malformed_contents_name_the_file(tmp_path, file, entry, value, why):
    write_cifar(tmp_path, ["train", "test"], b"fine_labels", 6, 100, "meta", b"fine_label_names")
    with open(tmp_path / file, "rb") as fh:
        d = pickle.load(fh)
    d[entry] = value
    with open(tmp_path / file, "wb") as fh:
        pickle.dump(d, fh)
    with pytest.raises(DataError, match=f"{tmp_path / file}: {why}"):
        describe_dataset("cifar100", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet


def make_tiny(root):
    """3 class folders, wnids.txt listing 2 of them; boxes files; val with an extra-class image."""
    wnids = ["n001", "n002", "n003"]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("n002\nn001\n")
    for c in wnids:
        lines = []
        for i in range(2):
            mode = "L" if (c, i) == ("n001", 1) else "RGB"
            save_image(root / f"train/{c}/images/{c}_{i}.JPEG", (64, 64), mode=mode, fmt="JPEG")
            lines.append(f"{c}_{i}.JPEG\t{1 + i}\t2\t10\t{20 + i}")
        (root / f"train/{c}/{c}_boxes.txt").write_text("\n".join(lines) + "\n")
    ann = []
    for i, c in enumerate(["n001", "n002", "n003", "n002"]):
        save_image(root / f"val/images/val_{i}.JPEG", (64, 64), fmt="JPEG")
        ann.append(f"val_{i}.JPEG\t{c}\t0\t0\t63\t{31 + i}")
    (root / "val/val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def test_tinyimagenet_boxes_and_class_subset(tmp_path):
    root = make_tiny(tmp_path / "tiny")
    d = load_dataset("tinyimagenet", str(root), image_size=64, progress=False, num_workers=0)
    assert d.class_names == ["n001", "n002"]  # wnids.txt decides (sorted); n003 is ignored
    assert d.train.images.shape == (4, 3, 64, 64) and d.train.labels.tolist() == [0, 0, 1, 1]
    # file x0=1 y0=2 x1=10 y1=20 (inclusive) -> (y0, y1, x0, x1) half-open
    assert d.train.boxes[0].tolist() == [2, 21, 1, 11] and d.train.boxes[1].tolist() == [2, 22, 2, 11]
    assert [Path(p).name for p in d.test.paths] == ["val_0.JPEG", "val_1.JPEG", "val_3.JPEG"]
    assert d.test.labels.tolist() == [0, 1, 1] and d.test.boxes[0].tolist() == [0, 32, 0, 64]
    half = load_dataset("tinyimagenet", str(root), image_size=32, progress=False, num_workers=0)
    assert half.train.boxes[0].tolist() == [1, 11, 0, 6]  # rescaled to the stored 32 px image
    assert half.test.boxes[0].tolist() == [0, 16, 0, 32]
    streamed = load_dataset("tinyimagenet", str(root), image_size=32, in_memory=False)
    assert torch.equal(streamed.train.boxes, half.train.boxes)


def test_tinyimagenet_missing_box_is_an_error(tmp_path):
    root = make_tiny(tmp_path / "tiny")
    save_image(root / "train/n001/images/n001_9.JPEG", (64, 64), fmt="JPEG")
    with pytest.raises(DataError, match="no box for n001_9.JPEG"):
        describe_dataset("tinyimagenet", str(root))
    (root / "wnids.txt").unlink()
    with pytest.raises(DataError, match="wnids.txt") as err:
        describe_dataset("tinyimagenet", str(root))
    assert "val_annotations.txt" in str(err.value)  # the layout is printed


@pytest.mark.parametrize("name, make, file", [
    ("tinyimagenet", "tiny", "wnids.txt"),
    ("tinyimagenet", "tiny", "train/n001/n001_boxes.txt"),
    ("tinyimagenet", "tiny", "val/val_annotations.txt"),
    ("food101", "food", "meta/classes.txt"),
    ("food101", "food", "meta/train.txt"),
    ("folder", "folder", "classes.txt"),            # a class_list
])
def test_a_text_file_that_is_not_utf8_names_the_file(tmp_path, name, make, file):
    root = {"tiny": make_tiny, "food": make_food, "folder": make_folder_tree}[make](tmp_path / "data")
    path = root / file
    lines = path.read_bytes().splitlines() if path.exists() else [b"cat", b"dog"]
    path.write_bytes(b"\n".join([lines[0], b"caf\xe9 " + lines[1]] + lines[2:]) + b"\n")   # Latin-1
    class_list = str(path) if name == "folder" else None
    with pytest.raises(DataError, match=rf"{path} is not UTF-8 text \(line 2 holds byte 0xe9\)"):
        describe_dataset(name, str(root), class_list=class_list)


@pytest.mark.skipif(not (REAL_DATA / "tiny-imagenet-50").is_dir(), reason="real tiny-imagenet-50 not present")
def test_real_tinyimagenet_50(tmp_path):
    root = str(REAL_DATA / "tiny-imagenet-50")
    wnids = sorted((REAL_DATA / "tiny-imagenet-50/wnids.txt").read_text().split())
    assert describe_dataset("tinyimagenet", root) == {"num_classes": 50, "num_train": 25000, "num_test": 2500,
                                                      "class_names": wnids}
    (tmp_path / "two.txt").write_text(f"{wnids[3]}\n{wnids[0]}\n")
    d = load_dataset("tinyimagenet", root, image_size=32, class_list=str(tmp_path / "two.txt"),
                     cache_dir=str(tmp_path / "cache"), progress=False)
    assert d.class_names == [wnids[0], wnids[3]]
    assert d.train.images.shape == (1000, 3, 32, 32) and len(d.test) == 100
    y0, y1, x0, x1 = d.train.boxes.unbind(1)
    assert ((0 <= y0) & (y0 < y1) & (y1 <= 32) & (0 <= x0) & (x0 < x1) & (x1 <= 32)).all()


@pytest.mark.skipif(not (REAL_DATA / "imagenette2").is_dir(), reason="real imagenette2 not present")
def test_real_imagenette_layout():
    info = describe_dataset("folder", str(REAL_DATA / "imagenette2"))
    assert (info["num_classes"], info["num_train"], info["num_test"]) == (10, 9469, 3925)
    assert info["class_names"] == sorted(p.name for p in (REAL_DATA / "imagenette2/train").iterdir())


# ----------------------------------------------------------------------------------------------
# ImageNet-100 / ImageNet-1000


def make_imagenet(root, num_classes, val=True):
    for i in range(num_classes):
        wnid = f"n{i:08d}"
        save_image(root / f"train/{wnid}/{wnid}_1.JPEG", (12, 10), colour=(i, 0, 0), fmt="JPEG")
        if val:
            save_image(root / f"val/{wnid}/ILSVRC2012_val_{i}.JPEG", (10, 12), fmt="JPEG")
    if val:
        (root / "val").mkdir(exist_ok=True)
    return root


def test_default_imagenet100_rule_is_the_documented_one():
    wnids = [f"n{i:08d}" for i in range(150)]
    chosen = default_imagenet100_classes(list(reversed(wnids)))
    perm = np.random.RandomState(1993).permutation(150)
    assert chosen == sorted(wnids[i] for i in perm[:100])
    assert chosen == default_imagenet100_classes(wnids) and len(set(chosen)) == 100
    with pytest.raises(ValueError):
        default_imagenet100_classes(wnids[:99])


def test_imagenet100_default_and_class_list(tmp_path):
    root = make_imagenet(tmp_path / "inet", 103)
    all_wnids = [f"n{i:08d}" for i in range(103)]
    assert describe_dataset("imagenet100", str(root)) == {"num_classes": 100, "num_train": 100, "num_test": 100,
                                                          "class_names": default_imagenet100_classes(all_wnids)}
    listing = ds._list_files(DATASETS["imagenet100"], str(root), None)
    assert listing["class_names"] == default_imagenet100_classes(all_wnids)

    class_list = tmp_path / "classes.txt"
    class_list.write_text("# my classes\nn00000002 some name\n\nn00000000\nn00000001\n")
    with pytest.warns(UserWarning, match="lists 3 classes, not 100"):
        d = load_dataset("imagenet100", str(root), image_size=8, class_list=str(class_list),
                         progress=False, num_workers=0)
    assert d.class_names == ["n00000000", "n00000001", "n00000002"]
    assert d.train.images.shape == (3, 3, 8, 8) and d.test.labels.tolist() == [0, 1, 2]
    assert d.train.images[:, 0, 4, 4].tolist() == pytest.approx([0, 1, 2], abs=3)

    class_list.write_text("n00000000\nn09999999\n")
    with pytest.raises(DataError, match="n09999999"):
        describe_dataset("imagenet100", str(root), class_list=str(class_list))
    with pytest.raises(DataError, match="does not exist"):
        describe_dataset("imagenet100", str(root), class_list=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is a folder, not a file"):   # once said "does not exist"
        describe_dataset("imagenet100", str(root), class_list=str(tmp_path))
    small = make_imagenet(tmp_path / "small", 5)
    with pytest.raises(DataError, match="needs >= 100 class folders"):
        describe_dataset("imagenet100", str(small))


def test_imagenet1000_streams_by_default(tmp_path):
    root = make_imagenet(tmp_path / "inet", 4)
    d = load_dataset("imagenet1000", str(root), image_size=8)
    assert d.train.images is None and len(d.train.paths) == 4 and d.train.labels.tolist() == [0, 1, 2, 3]
    assert FileImages(d.train.paths, 8)[1].shape == (3, 8, 8)
    d = load_dataset("imagenet1000", str(root), image_size=8, in_memory=True, progress=False, num_workers=0)
    assert d.train.images.shape == (4, 3, 8, 8)
    noval = make_imagenet(tmp_path / "noval", 2, val=False)
    with pytest.raises(DataError, match=r"valprep\.sh"):
        describe_dataset("imagenet1000", str(noval))
    save_image(noval / "val/ILSVRC2012_val_00000001.JPEG", fmt="JPEG")  # the flat archive layout
    with pytest.raises(DataError, match="holds images directly"):
        describe_dataset("imagenet1000", str(noval))


# ----------------------------------------------------------------------------------------------
# Food-101


def make_food(root):
    for c, ids in (("apple_pie", ["11", "12", "13"]), ("waffles", ["21", "22"])):
        for i in ids:
            save_image(root / f"images/{c}/{i}.jpg", (30, 20), fmt="JPEG")
    (root / "meta").mkdir()
    (root / "meta/classes.txt").write_text("apple_pie\nwaffles\n")
    (root / "meta/train.txt").write_text("apple_pie/11\napple_pie/13\nwaffles/22\n")
    (root / "meta/test.txt").write_text("apple_pie/12\nwaffles/21\n")
    return root


def test_food101_layout(tmp_path):
    root = make_food(tmp_path / "food-101")
    d = load_dataset("food101", str(root), image_size=16, progress=False, num_workers=0)
    assert d.class_names == ["apple_pie", "waffles"] and d.mean == (0.485, 0.456, 0.406)
    assert d.train.labels.tolist() == [0, 0, 1] and d.test.labels.tolist() == [0, 1]
    assert [Path(p).name for p in d.train.paths] == ["11.jpg", "13.jpg", "22.jpg"]
    assert d.train.images.shape == (3, 3, 16, 16)
    (root / "meta/test.txt").write_text("apple_pie/12\nwaffles/99\n")
    with pytest.raises(DataError, match="waffles/99"):
        describe_dataset("food101", str(root))
    (root / "meta/test.txt").write_text("pizza/1\n")
    with pytest.raises(DataError, match="pizza/1"):
        describe_dataset("food101", str(root))


# ----------------------------------------------------------------------------------------------
# Arguments and registry


def test_registry_defaults():
    assert set(DATASETS) == {"shapes", "folder", "cifar10", "cifar100", "tinyimagenet", "imagenet100",
                             "imagenet1000", "food101"}
    assert [n for n, i in DATASETS.items() if i.streamed] == ["imagenet1000"]
    assert (DATASETS["tinyimagenet"].image_size, DATASETS["tinyimagenet"].input_size) == (64, 64)
    assert (DATASETS["food101"].image_size, DATASETS["food101"].input_size) == (256, 224)
    assert DATASETS["cifar100"].augment == "crop_flip" and DATASETS["imagenet100"].augment == "resized_crop"


@pytest.mark.parametrize("kwargs", [
    dict(name="mnist", data_root=None, image_size=32),
    dict(name="shapes", data_root=None, image_size=4),
    dict(name="shapes", data_root=None, image_size=32.0),
    dict(name="cifar10", data_root="x", image_size=32, class_list="classes.txt"),
    dict(name="cifar10", data_root="x", image_size=32, in_memory=False),
    dict(name="folder", data_root="x", image_size=32, shapes={"num_classes": 3}),
])
def test_bad_arguments_raise_config_error(kwargs):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError):
        load_dataset(name, **kwargs)


def test_errors_are_user_errors_with_paths(tmp_path):
    notdir = tmp_path / "file"
    notdir.write_text("")
    with pytest.raises(DataError, match=str(notdir)):
        load_dataset("food101", str(notdir), image_size=16)
    with pytest.raises(DataError, match="meta/classes.txt"):
        load_dataset("food101", str(tmp_path), image_size=16)
    assert os.path.isdir(tmp_path)


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """issue 12: a full disk while writing the (optional) decoded-image cache must not stop the run."""
    import errno

    import torch

    from utils import image_cache

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "cache" / "x.pt"
    with pytest.warns(UserWarning, match=rf"Could not write the dataset cache {target} \(No space left"):
        image_cache.save_cache(str(target), {"key": 1})
    assert not target.exists() and not list((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------------------------
# stored form "whole" (config key stored_form)


def test_whole_form_keeps_every_training_image_whole_with_its_size(tmp_path):
    root = make_folder_tree(tmp_path / "data")
    # a landscape image whose sides are a colour the centre never has
    img = Image.new("RGB", (90, 30), (0, 0, 255))
    img.paste((255, 255, 0), (30, 0, 60, 30))
    img.save(root / "train/cat/wide.png")
    crop = load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0)
    whole = load_dataset("folder", str(root), image_size=16, progress=False, num_workers=0, stored_form="whole")
    assert crop.train.orig_hw is None and whole.test.orig_hw is None
    assert whole.train.images.shape == crop.train.images.shape           # the same S x S tensor: no extra pixels
    sizes = {os.path.basename(p): hw for p, hw in zip(whole.train.paths, whole.train.orig_hw.tolist())}
    assert sizes["a.png"] == [30, 40] and sizes["b.JPG"] == [50, 30] and sizes["wide.png"] == [30, 90]
    assert torch.equal(whole.test.images, crop.test.images)              # test split: always the centre crop
    k = whole.train.paths.index(str(root / "train/cat/wide.png"))
    blue = lambda x: ((x[2] > 200) & (x[0] < 50)).float().mean().item()  # noqa: E731
    assert blue(crop.train.images[k]) == 0.0                             # the centre crop lost the sides
    assert blue(whole.train.images[k]) == pytest.approx(2 / 3, abs=0.1)  # the whole image kept them
    # square originals are stored the same way in both forms
    k = whole.train.paths.index(str(root / "train/cat/sub/c.png"))
    assert torch.equal(whole.train.images[k], crop.train.images[k])


def test_whole_form_has_its_own_cache_and_the_crop_key_is_unchanged(tmp_path, monkeypatch):
    root, cache = make_folder_tree(tmp_path / "data"), tmp_path / "cache"
    load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0)
    (crop_file,) = cache.iterdir()
    # the crop form's key is computed from exactly what it was computed from before the whole form existed
    listing = ds._list_files(DATASETS["folder"], str(root), None)
    files = listing["train"].paths + listing["test"].paths
    arrays = [listing[s].labels for s in ("train", "test")]
    key = image_cache.cache_key({"dataset": "folder", "root": str(root), "image_size": 16,
                                 "classes": listing["class_names"], "skip_unreadable": False}, files, arrays)
    assert crop_file.name == os.path.basename(image_cache.cache_path(str(cache), "folder", 16, key))
    first = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False, num_workers=0,
                         stored_form="whole")
    assert len(list(cache.iterdir())) == 2
    with monkeypatch.context() as m:
        m.setattr(image_cache, "decode_images", _must_not_decode)
        second = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False,
                              stored_form="whole")
        crop_again = load_dataset("folder", str(root), image_size=16, cache_dir=str(cache), progress=False)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.train.orig_hw, second.train.orig_hw)
    assert crop_again.train.orig_hw is None


def test_stored_form_default_and_refusals():
    assert ds.stored_form("folder", None, None, None) == "whole"
    assert ds.stored_form("imagenet100", "resized_crop", None, None) == "whole"
    assert ds.stored_form("food101", None, True, None) == "whole"
    for name, augment, in_memory in [("folder", "crop_flip", None), ("folder", None, False), ("imagenet1000", None, None),
                                     ("shapes", "resized_crop", None), ("cifar100", None, None),
                                     ("tinyimagenet", "resized_crop", None)]:
        assert ds.stored_form(name, augment, in_memory, None) == "crop"
        assert ds.stored_form(name, augment, in_memory, "crop") == "crop"
        with pytest.raises(ConfigError, match="'stored_form'"):
            ds.stored_form(name, augment, in_memory, "whole")
    assert ds.stored_form("folder", None, None, "crop") == "crop"


# ----------------------------------------------------------------------------------------------
# stream_decode "device": the workers read bytes, each batch is decoded by torchvision in this process

def _photo(w, h, seed, mode="RGB"):
    """A textured image (gradients + noise + a bright disc): resizing it changes its pixels, so
    the decoders' differences show."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(250, 250, 250))
    return img.convert(mode)


# (width, height): landscape, portrait, square, very wide, large enough for Pillow's DCT draft (1/2, 1/4)
JPEG_SIZES = [(60, 40), (40, 60), (48, 48), (120, 37), (150, 110), (260, 190)]


def _jpeg_files(folder):
    """JPEGs of ``JPEG_SIZES``, a greyscale JPEG, a PNG named .JPEG (as ImageNet has one) and a
    CMYK JPEG: their paths in that order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(JPEG_SIZES):
        paths.append(folder / f"{i}.JPEG")
        _photo(w, h, i).save(paths[-1], format="JPEG", quality=90)
    paths.append(folder / "grey.JPEG")
    _photo(50, 70, 10, "L").save(paths[-1], format="JPEG", quality=90)
    paths.append(folder / "png.JPEG")
    _photo(44, 36, 11).save(paths[-1], format="PNG")
    paths.append(folder / "cmyk.JPEG")
    _photo(36, 52, 12, "CMYK").save(paths[-1], format="JPEG", quality=90)
    return [str(p) for p in paths]


def _both_decoders(paths, size, **kwargs):
    from utils import batching

    pillow = batching.materialize(FileImages(paths, size), **kwargs)
    device = batching.materialize(FileImages(paths, size, torch.device("cpu")), **kwargs)
    return pillow, device


def test_device_decode_is_close_to_pillow_and_falls_back_for_non_jpeg(tmp_path):
    """Measured (mean |difference| in uint8 levels over all pixels, Pillow path vs torchvision on
    the CPU): these noisy files 0.78 at 16 px (worst image 1.79) and 0.26 at 32 px (worst 0.80); real
    photos (60 imagenette2 files upscaled to 500x375 and the like) 0.17 at 256 px, 0.18 at 224, 0.28
    at 64; the 224 px imagenette2 originals 0.67 at 112 px (exactly Pillow's DCT scale 1/2), 0.16 at
    160 and 0 at 224 (no resize: the same libjpeg-turbo). Why they differ: Pillow decodes a large JPEG
    at a reduced DCT scale, which the device path imitates with an s x s mean, and the two bilinear
    resamplers round differently. The PNG goes to Pillow, so it is identical."""
    paths = _jpeg_files(tmp_path / "img")
    for size, bound, worst in ((16, 1.2, 2.5), (32, 0.5, 1.2)):
        pillow, device = _both_decoders(paths, size)
        assert device.shape == (len(paths), 3, size, size) and device.dtype == torch.uint8
        diff = (pillow.int() - device.int()).abs().float()
        assert diff.mean() < bound, (size, diff.mean((1, 2, 3)))
        assert diff.mean((1, 2, 3)).max() < worst, (size, diff.mean((1, 2, 3)))   # no image off as a whole
        assert torch.equal(device[paths.index(str(tmp_path / "img/png.JPEG"))],
                           pillow[paths.index(str(tmp_path / "img/png.JPEG"))])
        grey = device[paths.index(str(tmp_path / "img/grey.JPEG"))]
        assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # at the files' own size nothing is resized: the same libjpeg-turbo decoding, to the pixel
    square = [p for p in paths if p.endswith("2.JPEG")]
    pillow, device = _both_decoders(square, 48)
    assert torch.equal(pillow, device)


def test_device_decode_resizes_images_of_one_size_together_with_the_pixels_each_gets_alone(tmp_path, monkeypatch):
    """finish_batch resizes the JPEGs of a batch that share a size in one call (in chunks of at most
    RESIZE_CHUNK_PIXELS of the device); every image gets exactly the pixels it gets resized alone,
    in its place."""
    from utils import stream_decode

    folder = tmp_path / "img"
    folder.mkdir()
    sizes = [(150, 110), (60, 40), (150, 110), (260, 190), (60, 40), (150, 110), (48, 48)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(str(folder / f"{i}.JPEG"))
        _photo(w, h, 20 + i).save(paths[-1], format="JPEG", quality=90)
    items = [stream_decode.read_encoded(p) for p in paths]
    cpu = torch.device("cpu")
    alone = torch.stack([stream_decode.to_stored(image[None], 32)[0]
                         for image in stream_decode._decode_jpegs(items, cpu)])
    calls = []
    real = stream_decode.to_stored

    def counted(images, size):
        calls.append(images.shape[0])
        return real(images, size)
    monkeypatch.setattr(stream_decode, "to_stored", counted)
    monkeypatch.setitem(stream_decode.RESIZE_CHUNK_PIXELS, "cpu", 1 << 18)
    assert torch.equal(stream_decode.finish_batch(items, 32, cpu), alone)
    assert sorted(calls) == [1, 1, 2, 3]             # one call per size
    calls.clear()
    monkeypatch.setitem(stream_decode.RESIZE_CHUNK_PIXELS, "cpu", 2 * 150 * 110)
    assert torch.equal(stream_decode.finish_batch(items, 32, cpu), alone)
    assert sorted(calls) == [1, 1, 1, 2, 2]          # the three 150x110 images in chunks of 2 and 1


def test_device_decode_in_loader_workers_and_through_subsets_and_concatenations(tmp_path):
    from utils import batching

    paths = _jpeg_files(tmp_path / "img")
    pillow, device = _both_decoders(paths, 16)
    serial = batching.materialize(FileImages(paths, 16, torch.device("cpu")), num_workers=0, batch_size=4)
    workers = batching.materialize(FileImages(paths, 16, torch.device("cpu")), num_workers=2, batch_size=4)
    assert torch.equal(serial, device) and torch.equal(workers, device)
    # a streamed subset joined with in-memory images (new images + exemplars in a stage)
    files = FileImages(paths, 16, torch.device("cpu"))
    extra = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    joined = batching.concat_images([batching.select(files, torch.tensor([5, 0, 7])), extra])
    assert batching.batch_finisher(joined) == files.finish_batch
    assert batching.batch_finisher(batching.select(FileImages(paths, 16), torch.tensor([0]))) is None
    for workers in (0, 2):
        got = torch.cat([b for b, in batching.iterate(joined, batch_size=4, num_workers=workers)])
        assert torch.equal(got, torch.cat([device[[5, 0, 7]], extra]))
    # a worker hands over no tensor (each would go through shared memory, and an item of ``extra``,
    # a view, would take all of ``extra`` there): bytes and decoded images come as numpy arrays
    from utils.stream_decode import EncodedImage

    loader = torch.utils.data.DataLoader(joined, batch_size=len(joined), num_workers=1, collate_fn=batching._as_list)
    (items,) = list(loader)
    assert [type(it) for it in items] == [EncodedImage] * 3 + [np.ndarray] * 3
    assert all(isinstance(it.data, np.ndarray) for it in items[:3])
    assert np.array_equal(np.stack(items[3:]), extra.numpy())


def test_device_decode_workers_hand_over_large_batches_within_a_low_open_file_limit(tmp_path, monkeypatch):
    """A DataLoader passes every torch tensor a worker returns through shared memory, one file
    descriptor per tensor: with one tensor of bytes per image, a batch of 256 needed 256 open files
    and failed ("Too many open files") under a limit of ~100 free descriptors (RLIMIT_NOFILE is
    often 1024; batches of 512 with 4 workers). The workers hand over numpy arrays instead (pickled,
    no descriptor), so a shuffled epoch of 300 files in batches of 256 with 2 workers gets through.
    Before, a worker's queue thread failed to send the batch (the error on its stderr) and the
    loader waited for it forever: the loader's timeout here makes that a failure."""
    import functools

    resource = pytest.importorskip("resource")
    from utils import batching

    folder = tmp_path / "img"
    folder.mkdir()
    paths = []
    for i in range(300):
        paths.append(str(folder / f"{i:03d}.JPEG"))
        Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 100)).save(paths[-1], format="JPEG", quality=90)
    files = FileImages(paths, 8, torch.device("cpu"))
    expected = batching.materialize(files, num_workers=0, batch_size=256)
    assert expected.shape == (300, 3, 8, 8)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_dir = "/proc/self/fd"
    open_now = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else 32
    low = open_now + 100   # room for the loader's pipes and processes, not for 256 tensors
    if hard != resource.RLIM_INFINITY and hard < low:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {low}")
    monkeypatch.setattr(batching, "DataLoader", functools.partial(batching.DataLoader, timeout=60))
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        seen = []
        for images, index in batching.iterate(files, torch.arange(len(paths)), batch_size=256, num_workers=2,
                                              generator=torch.Generator().manual_seed(0)):
            assert images.shape == (len(index), 3, 8, 8) and images.dtype == torch.uint8
            assert torch.equal(images, expected[index])
            seen.append(index)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [len(i) for i in seen] == [256, 44] and sorted(torch.cat(seen).tolist()) == list(range(300))


def test_device_decode_falls_back_to_pillow_for_a_rejected_jpeg(tmp_path, monkeypatch):
    """A JPEG that decode_jpeg rejects (on a GPU: CMYK) is decoded by Pillow, alone; the others of
    its batch still by torchvision; one warning names the file."""
    import torchvision.io
    from utils import stream_decode

    paths = _jpeg_files(tmp_path / "img")
    pillow, device = _both_decoders(paths, 16)
    real = torchvision.io.decode_jpeg
    cmyk = os.path.getsize(paths[-1])

    def rejects_cmyk(data, **kwargs):
        if any(len(d) == cmyk for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported colour space")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", rejects_cmyk)
    monkeypatch.setattr(stream_decode, "_fallback_noted", False)
    with pytest.warns(UserWarning, match="cmyk.JPEG") as rec:
        got = batching_materialize(paths)
    assert len([w for w in rec if "decode_jpeg rejected" in str(w.message)]) == 1
    assert torch.equal(got[-1], pillow[-1]) and torch.equal(got[:-1], device[:-1])


def batching_materialize(paths, size=16):
    from utils import batching

    return batching.materialize(FileImages(paths, size, torch.device("cpu")))


def test_device_decode_of_an_unreadable_file_raises_naming_it(tmp_path, monkeypatch):
    from utils import stream_decode

    paths = _jpeg_files(tmp_path / "img")
    bad = tmp_path / "img/broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")   # passes for a JPEG, rejected by both
    monkeypatch.setattr(stream_decode, "_fallback_noted", False)
    with pytest.raises(DataError, match="broken.JPEG") as err, pytest.warns(UserWarning, match="broken.JPEG"):
        batching_materialize(paths + [str(bad)])
    assert str(err.value).startswith(f"Cannot read image {bad} (")
    gone = tmp_path / "img/gone.JPEG"   # listed, then deleted: the worker's read fails
    with pytest.raises(DataError, match="gone.JPEG"):
        batching_materialize([paths[0], str(gone)])
    empty = tmp_path / "img/empty.JPEG"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.JPEG"):
        batching_materialize([str(empty)])
