"""Decoding a streamed set: a batch finished on the device (``stream_decode: "device"``) by resize
chunk, and a source decoded whole through loader workers (``--materialize``).

    python exps/bench_stream_decode.py --files "../shared/data/imagenette2/train/*/*.JPEG"
        [--sizes 32 112 256] [--chunks 0 16 18 20 22 24] [--batch 256] [--repeat 5]
        [--long_side 500] [--device cpu|cuda] [--threads 1] [--out stream_decode.json]
    python exps/bench_stream_decode.py --files "..." --materialize 20 300 1300 --workers 2 --sizes 224

``utils.stream_decode.finish_batch`` decodes a batch of JPEG bytes in one
``torchvision.io.decode_jpeg`` call and resizes the images that share a size together, in chunks
of at most ``RESIZE_CHUNK_PIXELS`` pixels (by device type). This bench times ``finish_batch`` on
the first ``--batch`` files (their bytes read beforehand, so no file reading is timed), for every
stored side in ``--sizes`` and every chunk 2^k pixels in ``--chunks`` (k = 0: every image alone,
as before the grouping), the best of ``--repeat`` passes after one warm-up, and checks that every
chunk gives the same pixels as the first ``--chunks`` entry (with the default 0: images resized
alone; ``same_pixels``). ``decode_ms`` is the ``decode_jpeg`` call alone. ``batch_invariant``
says whether finishing the files in batches of ``--small_batch`` gives the same pixels as in one
batch: the memory update decodes its kept exemplars a second time, in other batches than the
share whose features chose them (on a GPU nvjpeg decodes a batch at once). The files of a
resized set (imagenette2's are all 224 x 224) share one size, the best case for grouping;
``--long_side N`` re-encodes each file to one of 8 shapes with an N px long side
(landscape and portrait, 4:3, 3:2, 5:4, 1:1, ...) first, as photos of the original ImageNet vary,
so that a batch holds several sizes.

``--materialize N ... --workers W`` times instead decoding the first N files whole with W loader
workers (Pillow in the workers, as ``stream_decode: "workers"``), the way the memory update
decodes a process's share of a class and the exemplars it keeps: ``batching.materialize``, which
spreads the images over the workers (``batching.loader_split``), beside the loader it replaced
(batches of 256 with all W workers). Each is the best of ``--repeat`` runs, taken in turns.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_throughput import check_out_file, run_main, sync  # noqa: E402
from utils import stream_decode  # noqa: E402
from utils.errors import UserError  # noqa: E402

# (width, height) shapes of --long_side L, as fractions of L
SHAPES = [(1, 0.75), (0.75, 1), (1, 2 / 3), (2 / 3, 1), (1, 0.8), (0.8, 1), (1, 1), (1, 0.5625)]


def encoded(paths: list[str], long_side: int | None) -> list[stream_decode.EncodedImage]:
    """The files' bytes; with ``long_side`` each re-encoded (JPEG, quality 90) to shape i mod 8 of SHAPES."""
    if long_side is None:
        return [stream_decode.read_encoded(p) for p in paths]
    from PIL import Image

    items = []
    for i, p in enumerate(paths):
        w, h = SHAPES[i % len(SHAPES)]
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((round(w * long_side), round(h * long_side))).save(
            buf, format="JPEG", quality=90)
        items.append(stream_decode.EncodedImage(p, np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()))
    return items


def timed(fn, device: torch.device, repeat: int) -> tuple[float, object]:
    """(best seconds of ``repeat`` calls after a warm-up, the last result)."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(items, sizes: list[int], chunks: list[int], device: torch.device, repeat: int,
          small_batch: int = 20) -> list[dict]:
    rows = []
    decode_s, decoded = timed(lambda: stream_decode._decode_jpegs(items, device), device, repeat)
    shapes = {tuple(im.shape[-2:]) for im in decoded if im is not None}
    saved = stream_decode.RESIZE_CHUNK_PIXELS.get(device.type)
    try:
        for size in sizes:
            reference = None
            small = torch.cat([stream_decode.finish_batch(items[i:i + small_batch], size, device)
                               for i in range(0, len(items), small_batch)])
            for k in chunks:
                stream_decode.RESIZE_CHUNK_PIXELS[device.type] = 1 << k
                seconds, out = timed(lambda: stream_decode.finish_batch(items, size, device), device, repeat)
                reference = out if reference is None else reference
                rows.append({"size": size, "chunk_pixels_log2": k, "images": len(items),
                             "distinct_shapes": len(shapes), "decode_ms": round(decode_s * 1e3, 1),
                             "finish_ms": round(seconds * 1e3, 1),
                             "images_per_s": round(len(items) / seconds, 1),
                             "same_pixels": bool(torch.equal(out, reference)),
                             "batch_invariant": bool(torch.equal(out, small))})
    finally:
        if saved is None:
            stream_decode.RESIZE_CHUNK_PIXELS.pop(device.type, None)
        else:
            stream_decode.RESIZE_CHUNK_PIXELS[device.type] = saved
    return rows


def time_materialize(paths: list[str], size: int, counts: list[int], workers: int, repeat: int) -> list[dict]:
    from utils import batching
    from utils.datasets import FileImages

    rows = []
    for n in counts:
        files = FileImages(paths[:n], size)
        best = {"split": float("inf"), "fixed_256": float("inf")}
        runs = {"split": lambda: batching.materialize(files, workers),
                "fixed_256": lambda: torch.cat([b for b, in batching.iterate(files, batch_size=256,
                                                                             num_workers=workers)])}
        for _ in range(repeat):
            for name, fn in runs.items():
                start = time.perf_counter()
                out = fn()
                best[name] = min(best[name], time.perf_counter() - start)
                assert out.shape[0] == len(files)
        w, b = batching.loader_split(len(files), workers)
        rows.append({"images": len(files), "workers": workers, "split_workers": w, "split_batch": b,
                     "split_s": round(best["split"], 3), "fixed_256_s": round(best["fixed_256"], 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", required=True, help="glob of JPEG files (sorted; the first --batch are used)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 112, 256])
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 18, 20, 22, 24],
                   help="chunk sizes as log2 of pixels (0: every image alone)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--small_batch", type=int, default=20, help="the batch of the batch_invariant check")
    p.add_argument("--long_side", type=int, default=None, help="re-encode the files to 8 shapes of this long side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--materialize", type=int, nargs="*", default=None,
                   help="time decoding this many files whole through loaders instead (counts)")
    p.add_argument("--workers", type=int, default=2, help="loader workers of --materialize")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    check_out_file(args.out)
    torch.set_num_threads(args.threads)
    if args.materialize:
        paths = sorted(glob.glob(args.files))[:max(args.materialize)]
        rows = time_materialize(paths, args.sizes[0], args.materialize, args.workers, args.repeat)
        print(f"decoding files whole at {args.sizes[0]} px with {args.workers} workers (s): spread over the workers "
              f"vs batches of 256")
        for r in rows:
            print(f"{r['images']:>6} images: {r['split_s']:>7} ({r['split_workers']} workers, batches of "
                  f"{r['split_batch']})  vs {r['fixed_256_s']:>7}")
        if args.out:
            Path(args.out).write_text(json.dumps({"files": args.files, "materialize": rows}, indent=1))
        return
    paths = sorted(glob.glob(args.files))[:args.batch]
    if not paths:
        raise UserError(f"--files {args.files}: no file matches.")
    device = torch.device(args.device)
    rows = bench(encoded(paths, args.long_side), args.sizes, args.chunks, device, args.repeat, args.small_batch)
    print(f"{len(paths)} files ({args.files}{', long side ' + str(args.long_side) if args.long_side else ''}) "
          f"on {device}, {rows[0]['distinct_shapes']} shapes, decode_jpeg alone {rows[0]['decode_ms']} ms")
    print(f"{'size':>5} {'chunk':>6} {'finish ms':>10} {'images/s':>9} same  batch_invariant")
    for r in rows:
        print(f"{r['size']:>5} {'2^' + str(r['chunk_pixels_log2']):>6} {r['finish_ms']:>10} {r['images_per_s']:>9} "
              f"{r['same_pixels']!s:5} {r['batch_invariant']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"files": args.files, "device": str(device), "long_side": args.long_side,
                                              "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(run_main(main))
