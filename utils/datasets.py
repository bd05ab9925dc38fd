"""Datasets: read every supported format from disk (never downloading) into uint8 tensors.

:func:`load_dataset` returns a :class:`Dataset`: class names plus a train and a test
:class:`ImageSet` of uint8 ``[N, 3, S, S]`` images (decoded once, optionally cached on disk) or, for
streamed sets, file paths read by :class:`FileImages`. Normalisation and augmentation happen later,
on the training device. :data:`DATASETS` lists the formats with their defaults and the expected
directory layout, which every :class:`~utils.errors.DataError` about a data root prints.

Conventions:
  - Class index = position in ``Dataset.class_names``: the sorted class folder names / wnids (as
    torchvision's ImageFolder numbers them), the order of ``meta`` for CIFAR and of
    ``meta/classes.txt`` for Food-101.
  - Samples are in sorted path order (class-sorted for the generated set, file order for CIFAR),
    so that runs are reproducible.
  - Decoding (see :mod:`utils.image_cache`): RGB, short side resized to ``image_size`` (bilinear,
    antialiased), centre ``image_size x image_size`` crop (stored form ``crop``). With the stored
    form ``whole`` (the default of the ``resized_crop`` formats, see :func:`stored_form`) the
    TRAINING split holds each whole image resized to ``image_size`` x ``image_size`` and its
    original size in ``ImageSet.orig_hw``, so that RandomResizedCrop sees the whole image as in
    the published pipelines; the test split is always ``crop`` (Resize + CenterCrop).
  - Boxes (shapes, Tiny-ImageNet) are ``(y0, y1, x0, x1)``, half-open, in stored-image pixels.

ImageNet-100 without ``class_list`` uses this documented, deterministic rule
(:func:`default_imagenet100_classes`): sort the wnids of the ``train/`` folders, shuffle them with
``numpy.random.RandomState(1993).permutation``, keep the first 100 and number them in sorted order.
The rule does not depend on the run's ``seed``, so every seed sees the same 100 classes.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import stat
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from utils import image_cache, shapes as shapes_set, stream_decode
from utils.errors import ConfigError, DataError
from utils.io import path_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# ----------------------------------------------------------------------------------------------
# Data structures


@dataclass
class ImageSet:
    """The samples of one split.

    ``labels``: int64 ``[N]``, class index into ``Dataset.class_names``.
    ``images``: uint8 ``[N, 3, S, S]`` when held in memory; None when streamed from ``paths``.
    ``paths``: the source file of each sample (streamed sets read them; in-memory file-based sets
    keep them for messages); None for generated/CIFAR data.
    ``boxes``: int64 ``[N, 4]`` ground-truth object box ``(y0, y1, x0, x1)``, half-open, in
    stored-image pixels; None when the dataset has no boxes.
    ``orig_hw``: int64 ``[N, 2]`` original ``(height, width)`` when the images are stored whole
    (squashed to S x S, stored form ``whole``); None for the centre-crop form.
    """

    labels: torch.Tensor
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    boxes: torch.Tensor | None = None
    orig_hw: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.labels)
        if self.images is None and self.paths is None:
            raise ValueError("an ImageSet needs images or paths")
        for what, value in (("images", self.images), ("paths", self.paths), ("boxes", self.boxes),
                            ("orig_hw", self.orig_hw)):
            if value is not None and len(value) != n:
                raise ValueError(f"ImageSet: {len(value)} {what} for {n} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A loaded dataset. ``image_size`` S is the stored square side; ``mean``/``std`` (0-1 scale)
    are the normalisation constants of the dataset."""

    name: str
    class_names: list[str]
    train: ImageSet
    test: ImageSet
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset format and its defaults.

    ``image_size``: default stored side; ``input_size``: default network input side; ``augment``:
    default train augmentation ("crop_flip": pad + random crop + flip; "resized_crop":
    ImageNet-style random resized crop + flip); ``streamed``: images stay on disk by default;
    ``layout``: the expected directory layout, printed by every DataError about the data root.
    """

    name: str
    image_size: int
    input_size: int
    augment: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    streamed: bool
    layout: str
    file_based: bool = True  # False: generated or pickled arrays (no decoding, no cache)
    # which of the data-location keys (data_root, class_list, shapes) the format reads; the others
    # are ignored, and so leave the run's identity alone (utils.config.config_hash)
    reads: tuple[str, ...] = ("data_root",)


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_FOLDER_LAYOUT = """\
data_root/
  train/<class>/<image>     images: .jpg .jpeg .png .bmp .webp (any case; sub-folders allowed)
  val/<class>/<image>       (or test/<class>/<image> when there is no val/)
Classes are the sorted sub-folder names of train/."""

_IMAGENET_LAYOUT = """\
data_root/                  the extracted ILSVRC-2012 (ImageNet-1k) folder
  train/<wnid>/*.JPEG       one folder per class, e.g. train/n01440764/n01440764_10026.JPEG
  val/<wnid>/*.JPEG         validation images sorted into class folders (e.g. with the usual
                            valprep.sh script), not the flat val/*.JPEG of the archive"""

_CIFAR_LAYOUT = """\
data_root/                  (or data_root/{sub}/)
  {files}
The "CIFAR python version" archive from https://www.cs.toronto.edu/~kriz/cifar.html, extracted."""

DATASETS: dict[str, DatasetInfo] = {
    "shapes": DatasetInfo(
        "shapes", 32, 32, "crop_flip", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False,
        "(generated from the `shapes` options, whose `seed` is the data seed; data_root is ignored)", file_based=False,
        reads=("shapes",)),
    "folder": DatasetInfo(
        "folder", 256, 224, "resized_crop", _IMAGENET_MEAN, _IMAGENET_STD, False, _FOLDER_LAYOUT),
    "cifar10": DatasetInfo(
        "cifar10", 32, 32, "crop_flip", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), False,
        _CIFAR_LAYOUT.format(sub="cifar-10-batches-py",
                             files="data_batch_1 ... data_batch_5, test_batch, batches.meta"),
        file_based=False),
    "cifar100": DatasetInfo(
        "cifar100", 32, 32, "crop_flip", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), False,
        _CIFAR_LAYOUT.format(sub="cifar-100-python", files="train, test, meta"), file_based=False),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", 64, 64, "crop_flip", _IMAGENET_MEAN, _IMAGENET_STD, False, """\
data_root/                       the extracted tiny-imagenet-200 folder (any subset of its classes)
  wnids.txt                      one wnid per line: the classes
  train/<wnid>/images/*.JPEG
  train/<wnid>/<wnid>_boxes.txt  lines: <file> <x0> <y0> <x1> <y1> (tab-separated, inclusive pixels)
  val/images/*.JPEG
  val/val_annotations.txt        lines: <file> <wnid> <x0> <y0> <x1> <y1>"""),
    "imagenet100": DatasetInfo(
        "imagenet100", 256, 224, "resized_crop", _IMAGENET_MEAN, _IMAGENET_STD, False,
        _IMAGENET_LAYOUT + """
The 100 classes: the wnids listed in `class_list` (a text file, one wnid per line), or without it
the first 100 of the sorted train/ wnids shuffled by numpy RandomState(1993).permutation
(so a train/ holding exactly 100 class folders gives those 100).""", reads=("data_root", "class_list")),
    "imagenet1000": DatasetInfo(
        "imagenet1000", 256, 224, "resized_crop", _IMAGENET_MEAN, _IMAGENET_STD, True, _IMAGENET_LAYOUT),
    "food101": DatasetInfo(
        "food101", 256, 224, "resized_crop", _IMAGENET_MEAN, _IMAGENET_STD, False, """\
data_root/                 the extracted food-101/ folder
  images/<class>/<id>.jpg
  meta/classes.txt         one class per line
  meta/train.txt           lines: <class>/<id>  (no extension)
  meta/test.txt"""),
}


def default_imagenet100_classes(wnids: list[str]) -> list[str]:
    """The default ImageNet-100 classes of ``wnids`` (all train wnids, >= 100 of them).

    Rule: sort, shuffle with ``numpy.random.RandomState(1993).permutation``, keep the first 100;
    returned sorted (the dataset's class numbering).
    """
    ordered = sorted(wnids)
    if len(ordered) < 100:
        raise ValueError(f"need at least 100 wnids, got {len(ordered)}")
    perm = np.random.RandomState(1993).permutation(len(ordered))
    return sorted(ordered[i] for i in perm[:100])


def is_streamed(name: str, in_memory: bool | None) -> bool:
    """Whether dataset ``name``'s images stay on disk and are decoded batch by batch
    (``in_memory`` None = the format's default; formats without image files never stream)."""
    info = DATASETS[name]
    return info.file_based and (info.streamed if in_memory is None else not in_memory)


def check_in_memory(name: str, in_memory: bool | None) -> None:
    """Config key ``in_memory``: false (stream) applies to datasets read from image files only;
    ConfigError naming the key otherwise."""
    if in_memory is False and not DATASETS[name].file_based:
        raise ConfigError(f"Config key 'in_memory' is false, which does not apply to dataset {name!r}: "
                          f"it has no image files to stream.")


def check_stream_decode(name: str, in_memory: bool | None, value: str) -> None:
    """Config key ``stream_decode``: "device" applies to streamed sets only (an in-memory set is
    decoded once, with Pillow, when it is loaded); ConfigError naming the key otherwise."""
    if value == "device" and not is_streamed(name, in_memory):
        why = (f"dataset {name!r} is not decoded from image files" if not DATASETS[name].file_based else
               f"dataset {name!r} is held in memory (in_memory {json.dumps(in_memory)}), decoded once when loaded")
        raise ConfigError(f"Config key 'stream_decode' is 'device', which applies to streamed datasets only: {why}. "
                          f"Use 'workers', or set in_memory false to stream a file-based dataset.")


STORED_FORMS = ("crop", "whole")


def stored_form(name: str, augment: str | None, in_memory: bool | None, requested: str | None) -> str:
    """The stored form of the training split (config key ``stored_form``; ``requested`` None = the
    default): ``whole`` for an in-memory file-based format without boxes whose augmentation
    (``augment`` None = the format's) is ``resized_crop``, else ``crop``. ``whole`` asked where it
    cannot be honoured raises ConfigError naming the key."""
    info = DATASETS[name]
    augment = augment or info.augment
    streamed = is_streamed(name, in_memory)
    why = None
    if augment != "resized_crop":
        why = f"the augmentation is {augment!r}; only 'resized_crop' crops from the whole image"
    elif not info.file_based:
        why = f"dataset {name!r} is not decoded from image files (its images are stored whole already)"
    elif streamed:
        why = "streamed images (in_memory false, or imagenet1000) are decoded as centre crops by the loader workers"
    elif name == "tinyimagenet":
        why = "its object boxes are mapped to the centre-crop form only"
    if requested is None:
        return "crop" if why else "whole"
    if requested not in STORED_FORMS:
        raise ConfigError(f"Config key 'stored_form' is {requested!r}; allowed: {', '.join(STORED_FORMS)} or null.")
    if requested == "whole" and why:
        raise ConfigError(f"Config key 'stored_form' is 'whole', which does not apply here: {why}. "
                          f"Use 'crop' or null.")
    return requested


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(name: str, data_root: str | None, *, image_size: int,
                 class_list: str | None = None, cache_dir: str | None = None,
                 skip_unreadable: bool = False, in_memory: bool | None = None,
                 shapes: dict | None = None, progress: bool = True,
                 num_workers: int | None = None, stored_form: str = "crop") -> Dataset:
    """Load dataset ``name`` from ``data_root`` with images stored at ``image_size`` px square.

    ``class_list``: a file of class names / wnids (one a
    line) restricting a file-based set to those classes (for imagenet100: the 100 classes).
    ``cache_dir``: keep decoded images there (reused when the files are unchanged).
    ``skip_unreadable``: skip undecodable images with a warning instead of raising DataError
    (streamed sets are not decoded here: an unreadable file raises when :class:`FileImages` reads it).
    ``in_memory``: None = the format's default (everything but imagenet1000 is decoded into
    memory); False streams a file-based set from disk (``ImageSet.images`` None, see
    :class:`FileImages`). ``shapes``: options of the procedural shapes set (its ``seed`` is the data
    seed, independent of a run's seed). ``progress``: tqdm bar.
    ``num_workers``: decoding processes (None = all usable cores, 0/1 = this process).
    ``stored_form``: "crop" or "whole" for the training split (see :func:`stored_form`, which
    the caller resolves; "whole" here requires an in-memory file-based set without boxes).
    Raises ConfigError for bad arguments and DataError for missing, malformed or unreadable data.
    """
    info = _check_arguments(name, class_list, in_memory, shapes)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}.")
    if name == "shapes":
        return _load_shapes(info, image_size, shapes)
    root = _check_root(info, data_root)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(info, root, image_size)
    listing = _list_files(info, root, class_list)
    streamed = info.streamed if in_memory is None else not in_memory
    whole = stored_form == "whole"
    if whole and (streamed or listing["train"].boxes is not None):
        raise ConfigError("Config key 'stored_form': 'whole' needs in-memory images without object boxes.")
    if streamed:
        train, test = (_streamed_set(listing[s], image_size) for s in ("train", "test"))
        return _make_dataset(info, listing["class_names"], train, test, image_size)

    key = target = None
    if cache_dir is not None:
        files = listing["train"].paths + listing["test"].paths
        arrays = [a for s in ("train", "test") for a in (listing[s].labels, listing[s].boxes) if a is not None]
        description = {"dataset": name, "root": root, "image_size": image_size,
                       "classes": listing["class_names"], "skip_unreadable": skip_unreadable}
        if whole:   # only the new form changes the key: existing crop caches stay valid
            description["stored_form"] = "whole"
        key = image_cache.cache_key(description, files, arrays)
        target = image_cache.cache_path(cache_dir, name, image_size, key)
        payload = image_cache.load_cache(target, key)
        if payload is not None:
            try:
                train, test = (ImageSet(**payload[s]) for s in ("train", "test"))
                if whole and train.orig_hw is None:
                    raise ValueError("no orig_hw for the stored form 'whole'")
                return _make_dataset(info, payload["class_names"], train, test, image_size)
            except (KeyError, TypeError, ValueError) as exc:  # readable but not what we wrote: rewrite
                warnings.warn(f"Ignoring malformed dataset cache {target} ({exc!r}); it will be rewritten.",
                              stacklevel=2)

    train, test = (_decode_split(info, root, s, listing[s], image_size, skip_unreadable, progress, num_workers,
                                 whole=whole and s == "train")
                   for s in ("train", "test"))
    _check_classes_present(info, root, listing["class_names"], train)
    if target is not None:
        image_cache.save_cache(target, {
            "key": key, "class_names": listing["class_names"],
            **{s: {"labels": st.labels, "images": st.images, "paths": st.paths, "boxes": st.boxes,
                   **({"orig_hw": st.orig_hw} if st.orig_hw is not None else {})}
               for s, st in (("train", train), ("test", test))}})
    return _make_dataset(info, listing["class_names"], train, test, image_size)


def describe_dataset(name: str, data_root: str | None, *, class_list: str | None = None,
                     shapes: dict | None = None) -> dict:
    """Check the layout without decoding any image: ``{"num_classes", "num_train", "num_test",
    "class_names"}`` (``class_names`` as :func:`load_dataset`'s ``Dataset.class_names``).

    Raises the same ConfigError/DataError as :func:`load_dataset` for a bad name, data root,
    layout or class list (not for unreadable image files, which need decoding to find).
    """
    info = _check_arguments(name, class_list, None, shapes)
    if name == "shapes":
        opts = shapes_set.check_options(shapes)
        return {"num_classes": opts["num_classes"], "num_train": opts["num_classes"] * opts["train_per_class"],
                "num_test": opts["num_classes"] * opts["test_per_class"],
                "class_names": shapes_set.class_names(opts["num_classes"])}
    root = _check_root(info, data_root)
    if name in ("cifar10", "cifar100"):
        names, train, test = _read_cifar(info, root, labels_only=True)
        return {"num_classes": len(names), "num_train": len(train[1]), "num_test": len(test[1]),
                "class_names": list(names)}
    listing = _list_files(info, root, class_list)
    return {"num_classes": len(listing["class_names"]), "num_train": len(listing["train"].paths),
            "num_test": len(listing["test"].paths), "class_names": list(listing["class_names"])}


class FileImages(torch.utils.data.Dataset):
    """Images of a streamed set, decoded on access exactly like the in-memory path.

    ``FileImages(paths, image_size)[i]`` -> uint8 ``[3, S, S]``; an unreadable file raises
    DataError naming it.

    ``decode_on`` (config key ``stream_decode`` "device": the run's device): items are the files'
    bytes instead (:class:`utils.stream_decode.EncodedImage`, read by the loader workers), and
    :meth:`finish_batch` decodes a batch of them on that device. ``utils.batching.iterate`` does
    this for every source that holds such a set, so no consumer sees another decoder.
    """

    def __init__(self, paths: list[str], image_size: int, decode_on: torch.device | None = None):
        self.paths = list(paths)
        self.image_size = image_size
        self.decode_on = decode_on

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        if self.decode_on is not None:
            return stream_decode.read_encoded(path)
        try:
            image, _ = image_cache.decode_image(path, self.image_size)
        except Exception as exc:
            raise stream_decode.unreadable(path, exc) from exc
        return torch.from_numpy(image)

    def finish_batch(self, items: list) -> torch.Tensor:
        """uint8 [B, 3, S, S] on ``decode_on`` from a batch of items (this set's encoded files and
        decoded images of in-memory sources joined with it): :func:`utils.stream_decode.finish_batch`."""
        return stream_decode.finish_batch(items, self.image_size, self.decode_on)


# ----------------------------------------------------------------------------------------------
# Argument and root checks


def _check_arguments(name, class_list, in_memory, shapes) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}.")
    info = DATASETS[name]
    if not info.file_based and class_list is not None:
        raise ConfigError(f"class_list does not apply to dataset {name!r} (only to folder, tinyimagenet, "
                          "imagenet100, imagenet1000 and food101).")
    check_in_memory(name, in_memory)
    if shapes and name != "shapes":
        raise ConfigError(f"The 'shapes' options only apply to dataset 'shapes', not {name!r}.")
    return info


def _layout_error(info: DatasetInfo, root: str | None, problem: str) -> DataError:
    return DataError(f"{problem}\nDataset {info.name!r} expects this layout under data_root "
                     f"({root}):\n{info.layout}")


def _check_root(info: DatasetInfo, data_root: str | None) -> str:
    if data_root is None or data_root == "":
        raise _layout_error(info, data_root, f"Dataset {info.name!r} needs data_root (none given).")
    root = os.path.abspath(os.path.expanduser(str(data_root)))
    if not os.path.isdir(root):
        raise _layout_error(info, root, f"data_root {root} {path_problem(root, 'folder')}.")
    return root


# ----------------------------------------------------------------------------------------------
# Generated and array datasets


def _make_dataset(info, class_names, train, test, image_size) -> Dataset:
    return Dataset(info.name, list(class_names), train, test, image_size, info.mean, info.std)


def _load_shapes(info, image_size, options) -> Dataset:
    opts = shapes_set.check_options(options)
    sets = []
    for split, per_class in (("train", opts["train_per_class"]), ("test", opts["test_per_class"])):
        s = shapes_set.generate_split(opts["num_classes"], per_class, image_size, opts["seed"], split)
        sets.append(ImageSet(labels=s.labels, images=s.images, boxes=s.boxes))
    return _make_dataset(info, shapes_set.class_names(opts["num_classes"]), *sets, image_size)


_CIFAR_FILES = {
    "cifar10": dict(sub="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", labels="labels", names="label_names"),
    "cifar100": dict(sub="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     labels="fine_labels", names="fine_label_names"),
}


def _unpickle(info, root, path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise _layout_error(info, root, f"Cannot read {path} ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(obj, dict):
        raise _layout_error(info, root, f"{path} does not hold a dict (not a CIFAR python-version file).")
    # the official files are Python-2 pickles (bytes keys); accept str keys too (a key that is not
    # UTF-8 cannot be one we look for: replaced, it is simply not found)
    return {(k.decode(errors="replace") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_names(info, root, path, raw) -> list[str]:
    """The class names of a CIFAR meta file's names entry ``raw`` (bytes or str each); DataError
    naming ``path`` when it is not a list of names."""
    try:
        if isinstance(raw, (str, bytes, dict)):
            raise TypeError
        items = list(raw)
    except TypeError:
        raise _layout_error(info, root, f"{path}: the class names must be a list, got {type(raw).__name__}.") from None
    names = []
    for n in items:
        try:
            names.append(n.decode() if isinstance(n, bytes) else str(n))
        except UnicodeDecodeError:
            raise _layout_error(info, root, f"{path}: class name {n!r} is not UTF-8 text.") from None
    return names


def _cifar_batch(info, root, path, d: dict, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 [N, 3072], labels int64 [N])`` of an unpickled CIFAR batch ``d``; DataError
    naming ``path`` when an entry is missing or is not that (a pickle can hold anything)."""
    if label_key not in d or "data" not in d:
        raise _layout_error(info, root, f"{path} lacks 'data' or '{label_key}'.")
    try:
        lab, data = np.asarray(d[label_key]), np.asarray(d["data"])
    except (ValueError, TypeError) as exc:  # e.g. rows of different lengths
        raise _layout_error(info, root, f"{path}: 'data' and '{label_key}' must be arrays ({exc}).") from None
    # integers only: int64 conversion would refuse strings with a bare ValueError and truncate floats
    if lab.size and lab.dtype.kind not in "iu":
        raise _layout_error(info, root, f"{path}: '{label_key}' must hold integer class indices, got values "
                                        f"such as {lab.reshape(-1)[0].item()!r}.")
    lab = lab.astype(np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(lab):
        raise _layout_error(info, root, f"{path}: 'data' must be uint8 [N, 3072] matching "
                                        f"{len(lab)} labels, got {data.dtype} {list(data.shape)}.")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise _layout_error(info, root, f"{path}: labels outside 0..{num_classes - 1}.")
    return data, lab


def _read_cifar(info, root, labels_only=False):
    """``(class_names, (images [N,3,32,32] uint8 | None, labels [N]) train, (...) test)``."""
    spec = _CIFAR_FILES[info.name]
    needed = spec["train"] + spec["test"] + [spec["meta"]]
    folder = next((d for d in (root, os.path.join(root, spec["sub"]))
                   if all(os.path.isfile(os.path.join(d, f)) for f in needed)), None)
    if folder is None:
        missing = [f for f in needed if not os.path.isfile(os.path.join(root, f))]
        raise _layout_error(info, root, f"Missing CIFAR file(s) in {root} (and in {spec['sub']}/): "
                                        f"{', '.join(missing)}.")
    meta_path = os.path.join(folder, spec["meta"])
    meta = _unpickle(info, root, meta_path)
    if spec["names"] not in meta:
        raise _layout_error(info, root, f"{meta_path} has no '{spec['names']}' entry.")
    names = _cifar_names(info, root, meta_path, meta[spec["names"]])

    def read(files):
        images, labels = [], []
        for f in files:
            path = os.path.join(folder, f)
            data, lab = _cifar_batch(info, root, path, _unpickle(info, root, path), spec["labels"], len(names))
            labels.append(lab)
            if not labels_only:
                images.append(data.reshape(-1, 3, 32, 32))
        return (np.concatenate(images) if images else None), np.concatenate(labels)

    return names, read(spec["train"]), read(spec["test"])


def _load_cifar(info, root, image_size) -> Dataset:
    names, train, test = _read_cifar(info, root)
    sets = []
    for images, labels in (train, test):
        x = torch.from_numpy(images)
        if image_size != 32:
            x = _resize_uint8(x, image_size)
        sets.append(ImageSet(labels=torch.from_numpy(labels), images=x))
    return _make_dataset(info, names, *sets, image_size)


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 [N,3,h,w] square images to [N,3,size,size] (bilinear, antialiased)."""
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for a in range(0, len(x), chunk):
        y = F.interpolate(x[a:a + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[a:a + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# File listings (no decoding): class names + per split (paths, labels, boxes in original pixels)


@dataclass
class _Split:
    paths: list[str]
    labels: np.ndarray                # int64 [N]
    boxes: np.ndarray | None = None   # int64 [N, 4] (y0, y1, x0, x1), half-open, original pixels


def _list_files(info, root, class_list) -> dict:
    """``{"class_names": [...], "train": _Split, "test": _Split}`` for a file-based format."""
    if info.name == "tinyimagenet":
        listing = _list_tinyimagenet(info, root, class_list)
    elif info.name == "food101":
        listing = _list_food101(info, root, class_list)
    else:  # folder, imagenet100, imagenet1000: an ImageFolder tree
        listing = _list_tree(info, root, class_list)
    if len(listing["train"].paths) == 0:
        raise _layout_error(info, root, f"No training images found under {root}.")
    if len(listing["test"].paths) == 0:
        raise _layout_error(info, root, f"No test/validation images found under {root}.")
    return listing


def _subdirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    """Sorted paths of the image files anywhere under ``folder`` (hidden entries skipped).

    Links are followed (a class folder may link elsewhere), but a folder whose real path this walk
    has entered already, or that holds ``folder``, is not entered: a link to itself or to a folder
    above (``ln -s . loop``) would list the same files over and over (os.walk follows it until the
    OS refuses, 40 levels down). Breadth first, links after real folders, names sorted: which of
    two routes to the same folder is kept does not depend on the file system's listing order.
    """
    found, entered, pending = [], set(), deque([folder])
    above = {str(p) for p in Path(os.path.realpath(folder)).parents}   # folders that hold it
    while pending:
        current = pending.popleft()
        real = os.path.realpath(current)
        if real in entered or real in above:
            continue
        entered.add(real)
        subdirs = []
        for entry in _scan(current):
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                subdirs.append(entry)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                _check_image_file(entry)
                found.append(entry.path)
        pending.extend(e.path for e in sorted(subdirs, key=lambda e: (e.is_symlink(), e.name)))
    return sorted(found)


def _folder_images(folder: str) -> list[str]:
    """Names of the image files directly in ``folder`` (Food-101's class folders, Tiny-ImageNet's
    val/images), each checked by :func:`_check_image_file`; folders named like images are not."""
    names = []
    for entry in _scan(folder):
        if entry.name.lower().endswith(IMAGE_EXTENSIONS) and not _is_dir(entry):
            _check_image_file(entry)
            names.append(entry.name)
    return names


def _scan(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder``; DataError naming it when it cannot be listed (os.walk would skip
    it silently, losing its images)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(f"Cannot list folder {folder} ({exc.strerror or exc}).") from exc


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one (a link loop is not: as os.walk does, it is
    taken as a file, which decoding reports as unreadable)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _check_image_file(entry: os.DirEntry) -> None:
    """Refuse an entry with an image name that is not a file to decode: a FIFO would block the
    decoder forever, a socket or a device is not an image. DataError naming it.

    A regular file or a link to one passes, and so does a link that leads nowhere or round in a
    loop: decoding reports those as unreadable (and ``skip_unreadable`` may skip them). The entry's
    type comes with the folder listing: no extra ``stat`` for a plain file (1.28M on ImageNet).
    """
    try:
        if entry.is_file():
            return
    except OSError:  # a link loop
        return
    if entry.is_symlink() and not os.path.exists(entry.path):
        return
    raise DataError(f"{entry.path} is {_special_kind(entry.path)}, not an image file (an image must be a regular "
                    f"file or a link to one). Delete it or move it out of the data folder.")


def _special_kind(path: str) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)", ...), for messages."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not a regular file"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _read_lines(info, root, path) -> list[str]:
    """The non-empty, non-comment lines of text file ``path``, stripped. DataError naming the file
    when it cannot be read or is not UTF-8 text (the line of the first bad byte helps find it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _layout_error(info, root, f"Cannot read {path} ({exc.strerror or exc}).") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _layout_error(info, root, f"{path} is not UTF-8 text (line {line} holds byte 0x{data[exc.start]:02x}); "
                                        f"save it as UTF-8.") from None
    # newline=None: the lines open() in text mode gives (\n, \r\n and \r end a line, nothing else)
    return [line.strip() for line in io.StringIO(text, newline=None)
            if line.strip() and not line.lstrip().startswith("#")]


def _select_classes(info, root, available: list[str], class_list: str | None) -> list[str]:
    """The classes to load, in ``available``'s order: all, those of ``class_list``, or (ImageNet-100
    without a list) the default rule."""
    if class_list is not None:
        path = os.path.abspath(os.path.expanduser(class_list))
        if not os.path.isfile(path):
            raise DataError(f"class_list file {path} {path_problem(path)} (expected one class name / wnid per "
                            f"line).")
        listed = [line.split()[0] for line in _read_lines(info, root, path)]
        duplicates = sorted(c for c, k in Counter(listed).items() if k > 1)
        if duplicates:
            raise DataError(f"class_list {path} lists {', '.join(duplicates[:5])} more than once.")
        known = set(available)
        missing = [c for c in listed if c not in known]
        if missing:
            raise _layout_error(info, root, f"{len(missing)} class(es) of class_list {path} have no data in "
                                            f"{root}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}.")
        if len(listed) < 2:
            raise DataError(f"class_list {path} must list at least 2 classes, it lists {len(listed)}.")
        if info.name == "imagenet100" and len(listed) != 100:
            warnings.warn(f"class_list {path} lists {len(listed)} classes, not 100 (dataset imagenet100).",
                          stacklevel=4)
        chosen = set(listed)
        return [c for c in available if c in chosen]
    if info.name == "imagenet100":
        if len(available) < 100:
            raise _layout_error(info, root, f"imagenet100 without class_list needs >= 100 class folders in "
                                            f"{os.path.join(root, 'train')}, found {len(available)}.")
        chosen = set(default_imagenet100_classes(available))
        return [c for c in available if c in chosen]
    return list(available)


def _split_from(pairs: list[tuple[str, int]], boxes: dict | None = None) -> _Split:
    """A _Split from (path, label) pairs, sorted by path; ``boxes`` maps path -> box."""
    pairs = sorted(pairs)
    paths = [p for p, _ in pairs]
    labels = np.asarray([label for _, label in pairs], dtype=np.int64)
    box_arr = None if boxes is None else np.asarray([boxes[p] for p in paths], dtype=np.int64).reshape(-1, 4)
    return _Split(paths, labels, box_arr)


def _list_tree(info, root, class_list) -> dict:
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise _layout_error(info, root, f"Missing folder {train_dir}.")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if test_dir is None:
        raise _layout_error(info, root, f"Missing folder {os.path.join(root, 'val')} (or test/).")
    available = _subdirs(train_dir)
    if not available:
        raise _layout_error(info, root, f"No class folders in {train_dir}.")
    unknown = sorted(set(_subdirs(test_dir)) - set(available))
    if unknown:
        raise _layout_error(info, root, f"{test_dir} has class folder(s) missing from {train_dir}: "
                                        f"{', '.join(unknown[:10])}.")
    classes = _select_classes(info, root, available, class_list)
    train, test, no_test = [], [], []
    for label, c in enumerate(classes):
        files = _image_files(os.path.join(train_dir, c))
        if not files:
            raise _layout_error(info, root, f"Class folder {os.path.join(train_dir, c)} holds no images "
                                            f"({', '.join(IMAGE_EXTENSIONS)}).")
        train += [(p, label) for p in files]
        class_test = _image_files(os.path.join(test_dir, c)) if os.path.isdir(os.path.join(test_dir, c)) else []
        if not class_test:
            no_test.append(c)
        test += [(p, label) for p in class_test]
    if not test and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(test_dir)):
        raise _layout_error(info, root, f"{test_dir} holds images directly, not in class folders "
                                        f"(the flat ILSVRC archive layout): sort them into {test_dir}/<class>/.")
    if test and no_test:
        warnings.warn(f"{len(no_test)} class(es) have no images in {test_dir}: {', '.join(no_test[:5])}"
                      f"{' ...' if len(no_test) > 5 else ''}.", stacklevel=4)
    return {"class_names": classes, "train": _split_from(train), "test": _split_from(test)}


def _parse_box(info, root, path, lineno, fields) -> tuple[int, int, int, int]:
    """Tiny-ImageNet ``x0 y0 x1 y1`` (inclusive) -> ``(y0, y1, x0, x1)`` half-open."""
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        raise _layout_error(info, root, f"{path} line {lineno}: expected 4 integers x0 y0 x1 y1, "
                                        f"got {' '.join(fields)!r}.") from None
    return y0, y1 + 1, x0, x1 + 1


def _list_tinyimagenet(info, root, class_list) -> dict:
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise _layout_error(info, root, f"Missing {wnids_path}.")
    available = sorted(set(_read_lines(info, root, wnids_path)))
    if not available:
        raise _layout_error(info, root, f"{wnids_path} lists no classes.")
    classes = _select_classes(info, root, available, class_list)
    label_of = {c: i for i, c in enumerate(classes)}

    train, boxes = [], {}
    for c in classes:
        img_dir = os.path.join(root, "train", c, "images")
        box_path = os.path.join(root, "train", c, f"{c}_boxes.txt")
        if not os.path.isdir(img_dir):
            raise _layout_error(info, root, f"Missing folder {img_dir} (class {c} of wnids.txt).")
        if not os.path.isfile(box_path):
            raise _layout_error(info, root, f"Missing box file {box_path}.")
        class_boxes = {}
        for n, line in enumerate(_read_lines(info, root, box_path), 1):
            fields = line.split()
            if len(fields) != 5:
                raise _layout_error(info, root, f"{box_path} line {n}: expected <file> x0 y0 x1 y1.")
            class_boxes[fields[0]] = _parse_box(info, root, box_path, n, fields[1:])
        files = _image_files(img_dir)
        if not files:
            raise _layout_error(info, root, f"No images in {img_dir}.")
        for p in files:
            rel = os.path.relpath(p, img_dir)
            if rel not in class_boxes:
                raise _layout_error(info, root, f"{box_path} has no box for {rel}.")
            boxes[p] = class_boxes[rel]
            train.append((p, label_of[c]))

    val_dir = os.path.join(root, "val", "images")
    ann_path = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isdir(val_dir) or not os.path.isfile(ann_path):
        raise _layout_error(info, root, f"Missing {val_dir}/ or {ann_path}.")
    present = set(_folder_images(val_dir))
    test = []
    for n, line in enumerate(_read_lines(info, root, ann_path), 1):
        fields = line.split()
        if len(fields) != 6:
            raise _layout_error(info, root, f"{ann_path} line {n}: expected <file> <wnid> x0 y0 x1 y1.")
        if fields[1] not in label_of:  # another class of the full set: not part of this one
            continue
        if fields[0] not in present:
            raise _layout_error(info, root, f"{ann_path} line {n} names {fields[0]}, missing from {val_dir}.")
        p = os.path.join(val_dir, fields[0])
        boxes[p] = _parse_box(info, root, ann_path, n, fields[2:])
        test.append((p, label_of[fields[1]]))
    return {"class_names": classes, "train": _split_from(train, boxes), "test": _split_from(test, boxes)}


def _list_food101(info, root, class_list) -> dict:
    meta, images = os.path.join(root, "meta"), os.path.join(root, "images")
    needed = [os.path.join(meta, f) for f in ("classes.txt", "train.txt", "test.txt")]
    missing = [p for p in needed + [images] if not os.path.exists(p)]
    if missing:
        raise _layout_error(info, root, f"Missing {', '.join(missing)}.")
    available = _read_lines(info, root, needed[0])
    known = set(available)
    classes = _select_classes(info, root, available, class_list)
    label_of = {c: i for i, c in enumerate(classes)}
    # one directory scan per class instead of one stat per image: id -> file name
    files_of: dict[str, dict[str, str]] = {}
    for c in classes:
        folder = os.path.join(images, c)
        if not os.path.isdir(folder):
            raise _layout_error(info, root, f"Missing folder {folder} (class {c} of meta/classes.txt).")
        files_of[c] = {os.path.splitext(f)[0]: f for f in _folder_images(folder)}

    def split(list_path):
        pairs = []
        for n, line in enumerate(_read_lines(info, root, list_path), 1):
            c, sep, image_id = line.partition("/")
            if not sep or c not in known:
                raise _layout_error(info, root, f"{list_path} line {n}: expected <class>/<id> with a class of "
                                                f"meta/classes.txt, got {line!r}.")
            if c not in label_of:
                continue
            if image_id not in files_of[c]:
                raise _layout_error(info, root, f"{list_path} line {n}: no image {line}.jpg in {images}.")
            pairs.append((os.path.join(images, c, files_of[c][image_id]), label_of[c]))
        return _split_from(pairs)

    return {"class_names": classes, "train": split(needed[1]), "test": split(needed[2])}


# ----------------------------------------------------------------------------------------------
# Decoding and streaming


def _decode_split(info, root, split, listing: _Split, image_size, skip_unreadable, progress, num_workers,
                  whole: bool = False) -> ImageSet:
    try:
        images, kept, orig_hw, failures = image_cache.decode_images(
            listing.paths, image_size, workers=num_workers, skip_unreadable=skip_unreadable,
            progress=progress, desc=f"{info.name} {split}", whole=whole)
    except image_cache.DecodeFailure as exc:
        path, reason = exc.failures[0]
        raise DataError(f"Cannot read image {path} ({reason}). Replace or delete it, or set "
                        "skip_unreadable=true to skip unreadable images.") from None
    if failures:
        shown = "\n  ".join(p for p, _ in failures[:5])
        warnings.warn(f"Skipped {len(failures)} unreadable {split} image(s) of {info.name}; "
                      f"first:\n  {shown}", stacklevel=3)
    boxes = None
    if listing.boxes is not None:
        boxes = torch.from_numpy(image_cache.map_boxes(listing.boxes[kept], orig_hw, image_size))
    return ImageSet(labels=torch.from_numpy(listing.labels[kept]), images=torch.from_numpy(images),
                    paths=[listing.paths[i] for i in kept], boxes=boxes,
                    orig_hw=torch.from_numpy(orig_hw) if whole else None)


def _check_classes_present(info, root, class_names, train: ImageSet) -> None:
    """After skipping unreadable files every class must still have a training image."""
    counts = torch.bincount(train.labels, minlength=len(class_names))
    empty = [class_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise _layout_error(info, root, f"No readable training image left for class(es) {', '.join(empty[:10])}.")


def _streamed_set(listing: _Split, image_size) -> ImageSet:
    boxes = None
    if listing.boxes is not None:
        # box mapping needs each image's size: read from the file headers only
        try:
            hw = np.asarray([image_cache.read_image_size(p) for p in listing.paths], dtype=np.int64)
        except Exception as exc:
            raise DataError(f"Cannot read an image header while mapping boxes ({type(exc).__name__}: {exc}).") from exc
        boxes = torch.from_numpy(image_cache.map_boxes(listing.boxes, hw, image_size))
    return ImageSet(labels=torch.from_numpy(listing.labels), images=None, paths=list(listing.paths), boxes=boxes)
