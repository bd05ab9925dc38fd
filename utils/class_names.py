"""Readable class names for prompts ("a photo of a {name}"), from what each dataset ships.

A dataset's own class names (``Dataset.class_names``) are identifiers: CIFAR's meta names and
Food-101's ``classes.txt`` are readable (``apple_pie`` → "apple pie"), folder names are taken as
they are, Tiny-ImageNet and ImageNet use WordNet ids, which ``words.txt`` (Tiny-ImageNet ships it;
for ImageNet bring it, or a ``class_names`` file) maps to words. A ``class_names`` file overrides
everything: one ``<class id><TAB><name>`` per line (the ``words.txt`` format; spaces work too), or
one name per line in the dataset's class order.
"""
from __future__ import annotations

import os

from utils.errors import DataError
from utils.io import path_problem

WORDNET_DATASETS = ("tinyimagenet", "imagenet100", "imagenet1000")


def read_name_file(path: str, ids: list[str]) -> dict[str, str]:
    """{class id: name} from a ``class_names`` / ``words.txt`` file (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"class_names file {path} {path_problem(path)} (expected '<class id><TAB><name>' per "
                        f"line).")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as exc:
        raise DataError(f"Cannot read class_names file {path} ({exc.strerror or exc}).") from exc
    except UnicodeDecodeError:
        raise DataError(f"class_names file {path} is not UTF-8 text; save it as UTF-8.") from None
    pairs = [line.split("\t", 1) if "\t" in line else line.split(None, 1) for line in lines]
    mapping = {p[0].strip(): p[1].strip() for p in pairs if len(p) == 2}
    if any(i in mapping for i in ids):
        return mapping
    if len(lines) == len(ids):           # one name per line, in class order
        return {i: line.strip() for i, line in zip(ids, lines)}
    raise DataError(f"class_names file {path}: no line names a class of this dataset (e.g. {ids[0]!r}) and it has "
                    f"{len(lines)} lines for {len(ids)} classes.")


def readable_names(dataset: str, data_root: str | None, ids: list[str], class_names_file: str | None = None) -> list[str]:
    """One readable name per class id (the first synonym of a WordNet entry; ``_`` → space)."""
    mapping: dict[str, str] = {}
    if class_names_file:
        mapping = read_name_file(class_names_file, ids)
    elif dataset in WORDNET_DATASETS:
        words = os.path.join(data_root or "", "words.txt")
        if not os.path.isfile(words):
            raise DataError(f"Dataset {dataset!r} names its classes by WordNet id; prompts need words: put "
                            f"words.txt (wnid<TAB>words) in {data_root} or set synthetic_replay.class_names "
                            f"to such a file.")
        mapping = read_name_file(words, ids)
    names = []
    for i in ids:
        name = mapping.get(i, i)
        if class_names_file is None and dataset in WORDNET_DATASETS:
            name = name.split(",")[0]
        names.append(name.replace("_", " ").strip())
    missing = [i for i in ids if i not in mapping] if mapping else []
    if missing and (class_names_file or dataset in WORDNET_DATASETS):
        raise DataError(f"No name for class(es) {missing[:5]} in {class_names_file or 'words.txt'}.")
    return names
