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


def build(data_root: str, per_class: int, out: str) -> tuple[Path, Path]:
    src, out = Path(data_root).resolve(), Path(out).resolve()
    data, replay = out / "data", out / "replay"
    shutil.rmtree(out, ignore_errors=True)
    (data / "train").mkdir(parents=True)
    for name in ("wnids.txt", "words.txt", "val"):
        os.symlink(src / name, data / name)
    wnids = [w.strip() for w in (src / "wnids.txt").read_text().split() if w.strip()]
    classes = {}
    for wnid in wnids:
        files = sorted(os.listdir(src / "train" / wnid / "images"))
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
                                                     f"{data}; an upper bound of what a generator could give"},
        "classes": classes})
    return data, replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", required=True)
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    data, replay = build(a.data_root, a.per_class, a.out)
    print(f"training data without the held-out images: {data}\noracle replay folder: {replay}")


if __name__ == "__main__":
    main()
