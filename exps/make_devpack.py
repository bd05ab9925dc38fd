"""Small copies of the shared data for a lent GPU machine, which receives at most 64 MiB with the
working tree (``exps/gpu_evidence.sh`` unpacks them):

    python exps/make_devpack.py [--shared ../shared/data] [--out .devpack] [--imagenette_train 300]

writes ``OUT/data.tar.gz`` holding
  tiny32/          ``tiny-imagenet-50`` re-encoded at 32 px (JPEG quality 92, Pillow bilinear
                   resize from 64 px; object boxes halved), the stored size of every tiny-imagenet
                   config, so a run stores the same 32 px images up to the second JPEG encoding;
  imagenette-sub/  ``imagenette2``'s first ``--imagenette_train`` training and
                   ``--imagenette_val`` validation files per class (sorted names), copied byte for
                   byte (224 px).
Add OUT to ``.git/info/exclude`` and name it in the device tool's ``carry``.
"""
from __future__ import annotations

import argparse
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def _halve_boxes_line(line: str, box_from: int) -> str:
    parts = line.split()
    parts[box_from:box_from + 4] = [str(int(v) // 2) for v in parts[box_from:box_from + 4]]
    return "\t".join(parts)


def _to_32(job: tuple[str, str]) -> None:
    src, dst = job
    with Image.open(src) as im:
        im.convert("RGB").resize((32, 32), Image.BILINEAR).save(dst, quality=92)


def tiny32(src: Path, dst: Path, workers: int) -> None:
    jobs = []
    for name in ("wnids.txt", "words.txt"):
        shutil.copy(src / name, dst / name)
    for wnid in (src / "wnids.txt").read_text().split():
        (dst / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        boxes = src / "train" / wnid / f"{wnid}_boxes.txt"
        if boxes.exists():
            lines = [_halve_boxes_line(ln, 1) for ln in boxes.read_text().splitlines() if ln.strip()]
            (dst / "train" / wnid / boxes.name).write_text("\n".join(lines) + "\n")
        for f in sorted((src / "train" / wnid / "images").iterdir()):
            jobs.append((str(f), str(dst / "train" / wnid / "images" / f.name)))
    (dst / "val" / "images").mkdir(parents=True, exist_ok=True)
    ann = src / "val" / "val_annotations.txt"
    lines = [_halve_boxes_line(ln, 2) for ln in ann.read_text().splitlines() if ln.strip()]
    (dst / "val" / ann.name).write_text("\n".join(lines) + "\n")
    for f in sorted((src / "val" / "images").iterdir()):
        jobs.append((str(f), str(dst / "val" / "images" / f.name)))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_to_32, jobs, chunksize=256))


def imagenette_subset(src: Path, dst: Path, per_class: dict[str, int]) -> None:
    for split, n in per_class.items():
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / split / cls.name / f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--out", default=".devpack")
    p.add_argument("--imagenette_train", type=int, default=300)
    p.add_argument("--imagenette_val", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    shared, out = Path(a.shared), Path(a.out)
    for need in (shared / "tiny-imagenet-50" / "wnids.txt", shared / "imagenette2" / "train"):
        if not need.exists():
            p.error(f"{need} is missing: --shared must be the folder holding tiny-imagenet-50/ and imagenette2/")
    stage = out / "build"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "tiny32").mkdir(parents=True)
    tiny32(shared / "tiny-imagenet-50", stage / "tiny32", a.workers)
    imagenette_subset(shared / "imagenette2", stage / "imagenette-sub",
                      {"train": a.imagenette_train, "val": a.imagenette_val})
    with tarfile.open(out / "data.tar.gz", "w:gz") as tar:
        for name in ("tiny32", "imagenette-sub"):
            tar.add(stage / name, arcname=name)
    shutil.rmtree(stage)
    print(f"{out / 'data.tar.gz'}: {(out / 'data.tar.gz').stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
