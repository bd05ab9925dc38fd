"""A folder dataset with each training image N times, as symbolic links, for measuring a phase of
more images per class than the data at hand (the device tool carries 64 MiB of data):

    python exps/tile_folder.py SRC DST N

DST/train/<class>/ holds ``<k>_<name>`` for k in 0..N-1, each a link to SRC/train/<class>/<name>;
DST's test split (``val`` or ``test``) is a link to SRC's. Every link is a path of its own, so a run
decodes and trains every copy as a separate image: the throughput is that of N × the images per class
(the accuracy is not, as the copies hold no new information).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import UserError  # noqa: E402
from utils.io import check_writable_dir  # noqa: E402


def tile(src: Path, dst: Path, copies: int) -> int:
    """Make DST from SRC (see the module docstring); returns the number of training links."""
    made = 0
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        out = dst / "train" / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in cls.rglob("*") if p.is_file()):
            name = "_".join(f.relative_to(cls).parts)
            for k in range(copies):
                link = out / f"{k}_{name}"
                if not link.exists():
                    link.symlink_to(f.resolve())
                made += 1
    for split in ("val", "test"):
        if (src / split).is_dir() and not (dst / split).exists():
            (dst / split).symlink_to((src / split).resolve(), target_is_directory=True)
    return made


def check_dst(src: Path, dst: Path) -> None:
    """UserError unless DST lies outside SRC (the links would be written into the source dataset, and
    a later run would train on them) and can be made a writable folder."""
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"DST {dst} is SRC {src} or lies inside it: the links would be written into the source "
                        f"dataset; give a folder outside SRC.")
    check_writable_dir(dst, "DST")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("copies", type=int)
    a = p.parse_args(argv)
    if a.copies < 1:
        p.error("copies must be at least 1")
    if not (a.src / "train").is_dir():
        p.error(f"{a.src / 'train'} is not a folder: SRC must be a folder dataset (train/<class>/<image>)")
    try:
        check_dst(a.src, a.dst)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{tile(a.src, a.dst, a.copies)} training links in {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
