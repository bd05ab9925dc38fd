"""The on-disk format of synthetic replay images: ``root/<class id>/<i:06d>.png`` + ``root/manifest.json``.

``<class id>`` is the dataset's own class name (a WordNet id, a CIFAR name, a folder name), which is
unique where readable names are not. Image ``i`` of a class was made with a seed derived from
(seed, class id, i), so the files in name order are in seed order, and the first n of them are the
n-per-class subset (the 20 / 100 / 500-per-class ablations of SDDR). Files whose name is not a
number are taken after the numbered ones, in name order (a hand-made folder works too).

``manifest.json`` says how the images were made: ``generator`` (kind, pipeline, model path and a
hash of its weights, dtype), ``scheduler``, ``num_inference_steps``, ``guidance_scale``,
``resolution``, ``prompt_template``, ``seed`` and ``seed_rule``, and ``classes`` ({class id: {name,
prompt}}). A folder of real images (an oracle source) states ``generator.kind`` "real-images" and
none of the generation fields. A run checks the fields the manifest states against its config.
"""
from __future__ import annotations

import json
import os

import torch

from utils import image_cache
from utils.errors import DataError
from utils.io import write_json

MANIFEST = "manifest.json"
FORMAT = "cim-cil synthetic replay 1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Fields of a manifest that must equal the run's settings of the same name.
GENERATION_FIELDS = ("prompt_template", "guidance_scale", "num_inference_steps", "resolution", "seed")


def image_name(i: int) -> str:
    return f"{i:06d}.png"


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"Synthetic replay folder {root} has no {MANIFEST}: it must say how its images were made "
                        f"(see README: Synthetic replay).")
    try:
        manifest = json.loads(open(path, encoding="utf-8").read())
    except (ValueError, OSError) as exc:
        raise DataError(f"Cannot read {path}: {exc}.") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} must hold a JSON object.")
    generator = manifest.get("generator")
    if not isinstance(generator, dict) or not isinstance(generator.get("kind"), str):
        raise DataError(f"{path}: field 'generator' must be an object with the 'kind' of what made the images "
                        f"(e.g. {{\"kind\": \"real-images\"}}, or a diffusers pipeline's record; see README: "
                        f"Synthetic replay), got {json.dumps(generator)[:80]}.")
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, dict)
                                    and all(isinstance(v, dict) for v in classes.values())):
        raise DataError(f"{path}: field 'classes' must be an object mapping each class id to an object (its "
                        f"name and prompt), got {json.dumps(classes)[:80]}.")
    return manifest


def write_manifest(root: str, manifest: dict) -> None:
    write_json(os.path.join(root, MANIFEST), manifest)


def check_manifest(manifest: dict, settings: dict, root: str) -> None:
    """DataError naming the first field the manifest states with another value than ``settings``
    (a setting of None is not checked)."""
    for field in GENERATION_FIELDS:
        want = settings.get(field)
        if field in manifest and want is not None and manifest[field] != want:
            raise DataError(f"Synthetic replay folder {root}: manifest field '{field}' is {json.dumps(manifest[field])} "
                            f"but the config's synthetic_replay.{field} is {json.dumps(want)}. Set it to the "
                            f"manifest's value or use images made with yours.")


def check_classes(manifest: dict, class_ids: list[str], prompts: dict[str, str] | None, root: str) -> None:
    """Every class id must be listed in the manifest (when it lists classes), with the same prompt
    when ``prompts`` is given and the manifest states one."""
    listed = manifest.get("classes")
    if listed is None:
        return
    missing = [c for c in class_ids if c not in listed]
    if missing:
        raise DataError(f"Synthetic replay folder {root}: manifest field 'classes' lacks {missing[:5]}"
                        f"{' …' if len(missing) > 5 else ''}.")
    for c in class_ids:
        made = listed[c].get("prompt")
        if prompts is not None and made is not None and made != prompts[c]:
            raise DataError(f"Synthetic replay folder {root}: class {c} was made with prompt {made!r}, "
                            f"this run's is {prompts[c]!r} (manifest field 'classes').")


def _order_key(name: str):
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def class_files(root: str, class_id: str) -> list[str]:
    """The image files of a class in seed order (an absent folder gives [])."""
    folder = os.path.join(root, class_id)
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=_order_key)]


def load_images(paths: list[str], size: int, workers: int | None = None) -> torch.Tensor:
    """uint8 [n, 3, size, size]: decoded like the dataset's images (short side resized, centre crop)."""
    if not paths:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    try:
        images, *_ = image_cache.decode_images(paths, size, workers=workers, progress=False)
    except image_cache.DecodeFailure as exc:
        raise DataError(f"Cannot read synthetic replay image(s): {exc}.") from None
    return torch.from_numpy(images)
