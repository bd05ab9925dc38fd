"""Build the "oracle" synthetic-replay source for bounding synthetic replay with real data.

From a Tiny-ImageNet-layout folder, hold out the first ``--per_class`` training images of every class
(in sorted file order): they become a replay folder (``utils/replay_folder.py`` format, manifest
``generator.kind`` "real-images") — what a perfect generator would give — and a copy of the dataset
without them (symbolic links, boxes filtered) is what every arm of the comparison trains on, so that
the real data and the real exemplar memory are the same with and without replay.

    python exps/make_oracle_replay.py --data_root ../shared/data/tiny-imagenet-50 --per_class 100 --out .cache/oracle
    # -> .cache/oracle/data (train on it: --set data_root=...), .cache/oracle/replay (synthetic_replay.path)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import replay_folder  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import check_writable_dir  # noqa: E402


STAGING = ".oracle-build-partial"   # a build is made here and moved into place when whole


def check_paths(src: Path, out: Path) -> None:
    """UserError unless ``src`` is a Tiny-ImageNet-layout folder and ``out`` is new, empty, or an earlier
    build of this script (only ``data/`` and ``replay/`` with its manifest, or a stopped build's
    ``STAGING`` folder beside them): the build replaces ``out``'s contents, and a mistyped ``--out``
    must never remove anything else."""
    for need in ("wnids.txt", "train", "val"):
        if not (src / need).exists():
            raise UserError(f"--data_root {src} is not a Tiny-ImageNet-layout folder: it has no {need}.")
    if not out.exists() and not out.is_symlink():
        check_writable_dir(out, "--out")   # under a file: refused here, not a NotADirectoryError at mkdir
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new or empty folder.")
    entries = set(os.listdir(out))
    earlier = entries <= {"data", "replay", STAGING} and (
        (out / "replay" / replay_folder.MANIFEST).is_file() or (out / STAGING).is_dir())
    if entries and not earlier:
        shown = ", ".join(sorted(entries)[:5]) + (" …" if len(entries) > 5 else "")
        raise UserError(f"--out {out} holds other files ({shown}), not an earlier oracle build (data/ and "
                        f"replay/{replay_folder.MANIFEST}, or a stopped build's {STAGING}/); give a new or empty "
                        f"folder (the build replaces what --out holds).")
    if src == out or out in src.parents:
        raise UserError(f"--out {out} contains --data_root {src}; give a folder outside it.")


def class_images(src: Path, per_class: int) -> dict[str, list[str]]:
    """The sorted training image names of every class ``src/wnids.txt`` names; UserError if the file is
    not UTF-8 text naming at least one class, a class has no ``train/<wnid>/images`` folder, or a class
    has no more than ``per_class`` images (holding them all out would leave it no training image)."""
    try:
        text = (src / "wnids.txt").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--data_root {src}: wnids.txt is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"it must list one class id (wnid) a line.") from None
    except OSError as err:
        raise UserError(f"--data_root {src}: cannot read wnids.txt: {err.strerror or err}.") from None
    wnids = [w.strip() for w in text.split() if w.strip()]
    if not wnids:
        raise UserError(f"--data_root {src}: wnids.txt names no class.")
    classes = {}
    for wnid in wnids:
        folder = src / "train" / wnid / "images"
        if not folder.is_dir():
            raise UserError(f"--data_root {src}: wnids.txt names class {wnid}, but train/{wnid}/images is not a "
                            f"folder.")
        try:
            files = sorted(os.listdir(folder))
        except OSError as err:
            raise UserError(f"--data_root {src}: cannot read {folder}: {err.strerror or err}.") from None
        if not files:
            raise UserError(f"--data_root {src}: class {wnid} has no training image (train/{wnid}/images is empty).")
        if len(files) <= per_class:
            raise UserError(f"--per_class {per_class} holds out every training image of class {wnid} (it has "
                            f"{len(files)}): its training data would be empty; give a --per_class below {len(files)}.")
        classes[wnid] = files
    return classes


def build(data_root: str, per_class: int, out: str) -> tuple[Path, Path]:
    src, out = Path(data_root).resolve(), Path(out).resolve()
    try:
        check_paths(src, out)
    except OSError as err:   # a name too long (Python 3.11's Path.exists raises ENAMETOOLONG), no permission
        name = str(err.filename or "")
        arg = max((p for p in (("--out", out), ("--data_root", src)) if name.startswith(str(p[1]))),
                  key=lambda p: len(str(p[1])), default=("--out", out))[0]
        raise UserError(f"{arg} cannot be used: {name or err}: {err.strerror or err}.") from None
    images = class_images(src, per_class)   # all validated before anything is created or removed
    staging = out / STAGING   # built whole here first: a stopped build leaves no half data/ or replay/
    shutil.rmtree(staging, ignore_errors=True)   # a stopped build's (check_paths allows nothing else)
    data, replay = staging / "data", staging / "replay"
    (data / "train").mkdir(parents=True)
    for name in ("wnids.txt", "words.txt", "val"):
        if (src / name).exists():   # words.txt (readable names) is optional
            os.symlink(src / name, data / name)
    classes = {}
    for wnid, files in images.items():
        held, kept = files[:per_class], set(files[per_class:])
        (data / "train" / wnid / "images").mkdir(parents=True)
        for f in kept:
            os.symlink(src / "train" / wnid / "images" / f, data / "train" / wnid / "images" / f)
        boxes = src / "train" / wnid / f"{wnid}_boxes.txt"
        if boxes.exists():
            lines = [ln for ln in boxes.read_text().splitlines() if ln.split("\t")[0] in kept]
            (data / "train" / wnid / boxes.name).write_text("\n".join(lines) + "\n")
        (replay / wnid).mkdir(parents=True)
        for i, f in enumerate(held):
            os.symlink(src / "train" / wnid / "images" / f, replay / wnid / f"{i:06d}.jpeg")
        classes[wnid] = {"source_files": held[:3] + (["…"] if len(held) > 3 else [])}
    replay_folder.write_manifest(str(replay), {
        "format": replay_folder.FORMAT,
        "generator": {"kind": "real-images", "note": f"{per_class} real training images per class held out of "
                                                     f"{out / 'data'}; an upper bound of what a generator could give"},
        "classes": classes})
    # Replace an earlier build (check_paths allows nothing else). Its manifest goes first: a stop
    # between the two moves leaves the new data/ beside an old replay/ that no run accepts (and the
    # staging folder, so the next build replaces both), never a mismatched pair that looks whole.
    (out / "replay" / replay_folder.MANIFEST).unlink(missing_ok=True)
    for part in ("data", "replay"):
        if (out / part).exists() or (out / part).is_symlink():
            shutil.rmtree(out / part)
        os.replace(staging / part, out / part)
    staging.rmdir()
    return out / "data", out / "replay"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", required=True)
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.per_class < 1:
        print(f"error: --per_class is {a.per_class}; it must be at least 1.", file=sys.stderr)
        return 2
    try:
        data, replay = build(a.data_root, a.per_class, a.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"training data without the held-out images: {data}\noracle replay folder: {replay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
