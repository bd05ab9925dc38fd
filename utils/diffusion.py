"""Generating labelled images with a local text-to-image pipeline (``diffusers``), into the replay
folder format of ``utils/replay_folder.py``.

Nothing is ever downloaded: the pipeline is loaded from a local folder with ``local_files_only``.
Image ``i`` of class ``c`` starts from a latent drawn by its own generator, seeded with
``stream_seed(seed, i, "synthetic/<class id>")``, and the images of a class are made in fixed
chunks of ``gen_batch_size`` (chunk j = images [j·b, (j+1)·b)), so that

* the same settings give the same bytes (on the same hardware and library versions);
* a stopped generation resumes: a chunk whose files all exist is skipped, a partly written one is
  made again (the same bytes) and only its missing files are written;
* chunks can be shared out among processes (``shard`` = (rank, world size)): chunk j goes to
  rank j mod world size.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from utils.errors import DataError, UserError
from utils.replay_folder import image_name
from utils.seeding import stream_seed

SEED_RULE = "image i of class c: torch.Generator().manual_seed(stream_seed(seed, i, 'synthetic/' + c)), " \
            "chunks of gen_batch_size"


def check_model_path(model_path: str | None) -> str:
    """The absolute path of a local pipeline folder, or DataError saying how to provide one."""
    how = ("Nothing is downloaded: on a machine with internet, save the pipeline once (e.g. "
           "`huggingface-cli download <repo id> --local-dir DIR`, or `pipe.save_pretrained(DIR)`), copy DIR "
           "here and set synthetic_replay.model_path to it.")
    if not model_path:
        raise DataError(f"synthetic_replay.model_path is not set (source 'diffusers' needs a local pipeline folder). {how}")
    path = os.path.abspath(os.path.expanduser(model_path))
    if not os.path.exists(path):
        looks_like_hub = "/" in model_path and not model_path.startswith((".", "/", "~")) and model_path.count("/") == 1
        what = "looks like a hub id, not a local folder" if looks_like_hub else "does not exist"
        raise DataError(f"synthetic_replay.model_path {model_path!r} {what}. {how}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise DataError(f"synthetic_replay.model_path {path} is not a diffusers pipeline folder (no model_index.json). {how}")
    return path


def weights_hash(path: str, memo_dir: str | None = None) -> str:
    """A digest of a pipeline folder: every file's relative name and its whole content (two
    fine-tunes of the same size that differ anywhere get different digests). Reading several GB
    takes seconds (minutes on network storage), so the digest is kept under the files' stamp (their
    paths, sizes and mtimes: ``image_cache.cache_key``, as the decoded-image cache keys its files):
    for the process, and with ``memo_dir`` in ``memo_dir/weights_digests.json`` for later runs,
    sweep runs and other ranks."""
    from utils.image_cache import cache_key

    files = []
    for dirpath, dirnames, names in sorted(os.walk(path)):
        dirnames.sort()
        files += [os.path.join(dirpath, name) for name in sorted(names)]
    stamp = cache_key({"pipeline weights": path}, files)
    memo = Path(memo_dir) / WEIGHTS_MEMO if memo_dir else None
    known = _read_memo(memo)
    if stamp in known:
        return known[stamp]
    digest = _content_digest(path, tuple(files), stamp)
    if memo is not None:
        from utils.io import write_json

        try:
            write_json(memo, {**_read_memo(memo), stamp: digest})
        except (OSError, UserError):   # a read-only or full cache folder: the digest is only not kept
            pass
    return digest


WEIGHTS_MEMO = "weights_digests.json"


def _read_memo(memo: Path | None) -> dict:
    if memo is None:
        return {}
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, files: tuple[str, ...], stamp: str) -> str:
    """The digest of ``files`` (under ``path``); ``stamp`` only keys the cache (a changed file, another
    stamp)."""
    h = hashlib.sha256()
    for full in files:
        h.update(f"{os.path.relpath(full, path)}\0{os.path.getsize(full)}\0".encode())
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def resolved_dtype(dtype: str, device: str) -> str:
    """The weights' precision of ``dtype`` on ``device`` ("auto": float16 on CUDA, float32 elsewhere;
    ``device`` "auto" is CUDA when one is available): what the generation key records, so that images
    made in float16 and in float32 never share a cache folder."""
    if dtype != "auto":
        return dtype
    if device == "auto":
        import torch

        return "float16" if torch.cuda.is_available() else "float32"
    return "float16" if str(device).startswith("cuda") else "float32"


def load_pipeline(model_path: str, device: str, dtype: str = "auto", attention_slicing: bool = False):
    """The text-to-image pipeline of a local folder, on ``device`` (fp16 on CUDA with dtype "auto")."""
    try:
        import torch
        from diffusers import DiffusionPipeline
    except ImportError as exc:
        raise DataError(f"synthetic_replay.source 'diffusers' needs the packages diffusers and transformers "
                        f"(pip install -r requirements.txt): {exc}.") from None
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # No hub hints, loading bars or logged load errors in the run's output: a failed load raises, and
    # its message is in the DataError below.
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity(logging.CRITICAL)
        logging.disable_progress_bar()
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}[resolved_dtype(dtype, device)]
    from diffusers.utils import deprecation_utils

    # Newer diffusers name the precision argument `dtype` (and warn on `torch_dtype`).
    newer = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    precision = {"dtype" if newer else "torch_dtype": torch_dtype}
    try:
        pipe = DiffusionPipeline.from_pretrained(model_path, local_files_only=True, safety_checker=None,
                                                 requires_safety_checker=False, **precision)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"Cannot load the pipeline in {model_path}: {exc}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if attention_slicing:
        pipe.enable_attention_slicing()
    return pipe


def pipeline_description(model_path: str, dtype: str, memo_dir: str | None = None) -> dict:
    """The manifest's ``generator`` and ``scheduler`` fields, read from the folder without loading it
    (``dtype`` resolved, never "auto": :func:`resolved_dtype`; ``memo_dir``: :func:`weights_hash`)."""
    try:
        index = json.loads((Path(model_path) / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {model_path}/model_index.json: {exc}.") from None
    scheduler = index.get("scheduler", [None, None])
    return {"generator": {"kind": "diffusers", "pipeline": index.get("_class_name"),
                          "weights_hash": weights_hash(model_path, memo_dir), "dtype": dtype},
            "scheduler": scheduler[1] if isinstance(scheduler, list) and len(scheduler) == 2 else None}


def image_seed(seed: int, class_id: str, i: int) -> int:
    return stream_seed(seed, i, f"synthetic/{class_id}")


def _save_png(path: str, array: np.ndarray) -> None:
    """Atomic PNG write (a stop never leaves a half-written image under its final name; two processes
    writing the same image write the same bytes, each through its own temporary file)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    tmp = f"{path}.{os.getpid()}.tmp"   # unique: two runs may fill one cache at once
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def generate_class(pipe, root: str, class_id: str, prompt: str, count: int, *, seed: int, steps: int,
                   guidance: float, resolution: int, batch_size: int, device: str,
                   shard: tuple[int, int] = (0, 1), first_chunk: int = 0, progress=None) -> int:
    """Make the missing images 0 … count−1 of one class in ``root/<class id>/``; returns how many
    were written. ``progress``: a callable told the number of images done after each chunk.

    ``shard`` (rank, world size): this process makes the chunks (of ``batch_size`` images) whose
    number, counted from ``first_chunk`` (the chunks of the classes made before this one), is its
    rank modulo the world size; numbered per class, chunk 0 of every class went to rank 0, and a
    class of one chunk left every other rank idle at the barrier that follows."""
    import torch

    folder = Path(root) / class_id
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    rank, world = shard
    for j, start in enumerate(range(0, count, batch_size), start=first_chunk):
        if j % world != rank:
            continue
        ids = list(range(start, min(start + batch_size, count)))
        missing = [i for i in ids if not (folder / image_name(i)).exists()]
        if not missing:
            if progress:
                progress(len(ids))
            continue
        gen_device = "cpu" if not str(device).startswith("cuda") else device
        generators = [torch.Generator(gen_device).manual_seed(image_seed(seed, class_id, i)) for i in ids]
        with torch.no_grad():
            out = pipe([prompt] * len(ids), num_inference_steps=steps, guidance_scale=guidance,
                       height=resolution, width=resolution, generator=generators, output_type="np")
        images = np.clip(np.round(np.asarray(out.images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        for i, img in zip(ids, images):
            if i in missing:
                _save_png(str(folder / image_name(i)), img)
                written += 1
        if progress:
            progress(len(ids))
    return written


def complete(root: str, class_id: str, count: int) -> bool:
    """Whether images 0 … count−1 of a class are all on disk."""
    folder = Path(root) / class_id
    return all((folder / image_name(i)).exists() for i in range(count))


def _component_config(model_path: str, component: str) -> dict:
    try:
        return json.loads((Path(model_path) / component / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {model_path}/{component}/config.json: {exc}.") from None


def latent_scale(model_path: str) -> int:
    """How many pixels of a side one latent cell covers (the VAE's downsampling, SD 1.x: 8)."""
    vae = _component_config(model_path, "vae")
    try:
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError) as exc:
        raise DataError(f"Cannot read the VAE's downsampling of {model_path} (vae/config.json "
                        f"block_out_channels): {exc}.") from None


def max_inference_steps(model_path: str) -> int | None:
    """The most denoising steps the pipeline's scheduler can take: its training timesteps, less its
    ``steps_offset`` (with 1, as SD 1.x has, 1000 steps of 1000 timesteps index past the end); None
    when its scheduler_config.json gives no ``num_train_timesteps``."""
    try:
        config = json.loads((Path(model_path) / "scheduler" / "scheduler_config.json").read_text())
        return int(config["num_train_timesteps"]) - (1 if int(config.get("steps_offset") or 0) > 0 else 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def side_multiple(model_path: str) -> int:
    """What a generated side must be a multiple of: the latent cell (:func:`latent_scale`) and 8,
    which Stable Diffusion pipelines require whatever their VAE."""
    return math.lcm(8, latent_scale(model_path))


def native_resolution(model_path: str) -> int:
    """The pipeline's native output side from its configs, without loading it (SD 1.x: 512)."""
    unet = _component_config(model_path, "unet")
    try:
        return int(unet["sample_size"]) * latent_scale(model_path)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"Cannot read the native resolution of {model_path} (unet/config.json sample_size, "
                        f"vae/config.json block_out_channels): {exc}; set synthetic_replay.resolution.") from None
