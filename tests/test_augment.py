"""Batched augmentation: shapes, reproducibility, and each step against a hand-made reference."""
import itertools

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils.augment import (AUTOAUGMENT_POLICIES, SIGNED_AUTOAUGMENT_OPS, TrainAugment,
                           apply_autoaugment_op, autoaugment_magnitude, normalize,
                           sample_resized_crop_boxes, test_transform)
from utils.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_images(batch=16, side=32, seed=0):
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=gen(seed))


def denormalize(x):
    """float normalised -> float on the 0..255 scale (exact up to float rounding)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def smooth_image(side=128):
    yy, xx = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    img = torch.stack([127 + 100 * torch.sin(xx / 9 + yy / 13), 127 + 100 * torch.cos(xx / 7),
                       127 + 100 * torch.sin(yy / 5)])
    return img.round().to(torch.uint8)[None]


FULL = dict(color_jitter=0.25, autoaugment="cifar10", cutout=8)


@pytest.mark.parametrize("kwargs", [dict(mode="crop_flip", **FULL), dict(mode="resized_crop", **FULL),
                                    dict(mode="none")])
def test_shape_dtype(kwargs):
    out = TrainAugment(24, MEAN, STD, **kwargs)(random_images(side=32), gen())
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32


@pytest.mark.parametrize("flip", [False, True])
def test_constant_image_normalises_to_constant(flip):
    images = torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    out = TrainAugment(8, MEAN, STD, mode="none", flip=flip)(images, gen())
    expected = ((200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected.expand_as(out))


@pytest.mark.parametrize("mode", ["crop_flip", "resized_crop"])
def test_reproducible_from_generator(mode):
    augment = TrainAugment(32, MEAN, STD, mode=mode, **FULL)
    images = random_images()
    first, again = augment(images, gen(1)), augment(images, gen(1))
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(images, gen(2)))


@pytest.mark.parametrize("mode", ["crop_flip", "resized_crop"])
def test_flip_really_flips(mode):
    # No crop (padding 0 / full-image box) so each output is the image or its mirror image.
    images = random_images(batch=32)
    augment = TrainAugment(32, MEAN, STD, mode=mode, padding=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = denormalize(augment(images, gen())).round().to(torch.uint8)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == torch.flip(images, dims=[-1])).flatten(1).all(1)
    assert torch.all(same ^ mirrored)
    assert 0 < mirrored.sum() < 32  # per sample, not per batch
    no_flip = TrainAugment(32, MEAN, STD, mode=mode, padding=0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           flip=False)
    assert torch.equal(denormalize(no_flip(images, gen())).round().to(torch.uint8), images)


def test_crop_is_shifted_window_of_padded_input():
    images = random_images(batch=16, side=12)
    out = denormalize(TrainAugment(12, MEAN, STD, padding=3, flip=False)(images, gen()))
    out = out.round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3))
    offsets = []
    for b in range(16):
        hits = [(dy, dx) for dy in range(7) for dx in range(7)
                if torch.equal(padded[b, :, dy:dy + 12, dx:dx + 12], out[b])]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 8  # offsets drawn per sample


def test_resized_crop_boxes_within_bounds():
    for height, width in [(32, 32), (128, 96), (40, 200)]:
        boxes = sample_resized_crop_boxes(2000, height, width, (0.08, 1.0), (3 / 4, 4 / 3), gen())
        top, left, h, w = boxes.unbind(1)
        assert boxes.dtype == torch.int64
        assert torch.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
        assert torch.all((top + h <= height) & (left + w <= width))
        area = (h * w).double() / (height * width)
        assert area.min() >= 0.05 and area.max() <= 1.0 and area.std() > 0.05  # sizes vary


def test_resized_crop_fallback_is_centred():
    # No try can fit an aspect ratio of 2..3 at full area: torchvision's centred fallback.
    boxes = sample_resized_crop_boxes(5, 100, 100, (1.0, 1.0), (2.0, 3.0), gen())
    assert torch.equal(boxes, torch.tensor([[25, 0, 50, 100]]).expand(5, 4))


def test_resized_crop_matches_torchvision_per_box():
    images = smooth_image(128).expand(8, -1, -1, -1).contiguous()
    augment = TrainAugment(112, MEAN, STD, mode="resized_crop", flip=False)
    out = denormalize(augment(images, gen(3)))
    boxes = sample_resized_crop_boxes(8, 128, 128, augment.scale, augment.ratio, gen(3))  # same draws
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(images[b], top, left, h, w, [112, 112], antialias=True).float()
        assert (out[b] - ref).abs().mean() < 1.0  # roi_align's resampling vs torchvision's


def test_cutout_zeroes_one_square_per_sample():
    images = torch.full((64, 3, 20, 20), 250, dtype=torch.uint8)  # normalised value far from 0
    out = TrainAugment(20, MEAN, STD, mode="none", flip=False, cutout=8)(images, gen())
    zero = out == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # same square in every channel
    zero = zero[:, 0]
    areas = zero.flatten(1).sum(1)
    for b in range(64):
        rows, cols = zero[b].any(1).nonzero(), zero[b].any(0).nonzero()
        height, width = len(rows), len(cols)
        assert areas[b] == height * width  # a rectangle ...
        assert 4 <= height <= 8 and 4 <= width <= 8  # ... that is the 8x8 square, clipped
    assert (areas == 64).sum() > 10 and (areas < 64).sum() > 10


def test_color_jitter_brightness_per_sample():
    images = torch.full((64, 3, 4, 4), 100, dtype=torch.uint8)
    out = denormalize(TrainAugment(4, MEAN, STD, mode="none", flip=False, color_jitter=0.5)(images, gen()))
    values = out[:, 0, 0, 0]
    assert torch.allclose(out, values.view(-1, 1, 1, 1).expand_as(out), atol=1e-3)  # brightness only
    assert values.min() >= 50 - 1e-3 and values.max() <= 150 + 1e-3
    assert values.std() > 10  # a factor per sample


def test_color_jitter_saturation_keeps_grey():
    grey = torch.full((8, 3, 4, 4), 90, dtype=torch.uint8)
    out = TrainAugment(4, MEAN, STD, mode="none", flip=False, color_jitter=(0.0, 0.5, 0.5))(grey, gen())
    torch.testing.assert_close(denormalize(out), torch.full_like(out, 90.0), atol=1e-3, rtol=0)


def test_autoaugment_per_sample_ops():
    """Copies of one image: every output is a possible outcome of some sub-policy, and the batch
    holds many different outcomes (torchvision's v2 transform would give one for the batch)."""
    image = smooth_image(32)
    batch = 128
    images = image.expand(batch, -1, -1, -1).contiguous()
    augment = TrainAugment(32, MEAN, STD, mode="none", flip=False, autoaugment="imagenet")
    out = denormalize(augment(images, gen())).round().to(torch.uint8)

    outcomes = set()
    for sub in AUTOAUGMENT_POLICIES["imagenet"]:
        for applied in itertools.product([False, True], repeat=2):
            for signs in itertools.product([1, -1], repeat=2):
                x = image
                for (op, _, mag), on, sign in zip(sub, applied, signs):
                    if on:
                        sign = sign if op in SIGNED_AUTOAUGMENT_OPS else 1
                        x = apply_autoaugment_op(x, op, sign * autoaugment_magnitude(op, mag, 32, 32))
                outcomes.add(x.numpy().tobytes())
    produced = {out[b:b + 1].numpy().tobytes() for b in range(batch)}
    assert produced <= outcomes
    assert len(produced) > 20


def test_autoaugment_tables_match_torchvision():
    reference = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if not hasattr(reference, "_policies") or not hasattr(reference, "_AUGMENTATION_SPACE"):
        pytest.skip("torchvision's private AutoAugment tables moved")
    for name, policy in [("imagenet", v2.AutoAugmentPolicy.IMAGENET),
                         ("cifar10", v2.AutoAugmentPolicy.CIFAR10)]:
        assert [tuple(s) for s in reference._get_policies(policy)] == AUTOAUGMENT_POLICIES[name]
    for op, (fn, _) in reference._AUGMENTATION_SPACE.items():
        values = fn(10, 40, 30)
        for b in range(10):
            expected = 0.0 if values is None else float(values[b])
            assert autoaugment_magnitude(op, None if values is None else b, 40, 30) == expected


def test_test_transform_centre_crop_exact():
    image = torch.arange(3 * 7 * 7, dtype=torch.uint8).view(1, 3, 7, 7)
    out = test_transform(image, 4, MEAN, STD)
    # torchvision's centre crop offset: round((7 - 4) / 2) = 2
    torch.testing.assert_close(out, normalize(image[:, :, 2:6, 2:6], MEAN, STD))
    torch.testing.assert_close(test_transform(image, 7, MEAN, STD), normalize(image, MEAN, STD))
    assert test_transform(image, 9, MEAN, STD).shape == (1, 3, 9, 9)  # resized up


def test_bad_arguments():
    with pytest.raises(ConfigError, match="crop_flip"):
        TrainAugment(32, MEAN, STD, mode="random_crop")
    with pytest.raises(ConfigError, match="cifar10"):
        TrainAugment(32, MEAN, STD, autoaugment="svhn")
    with pytest.raises(ValueError):
        TrainAugment(32, MEAN, STD)(random_images().float(), gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_images_cpu_generator_match_cpu():
    augment = TrainAugment(32, MEAN, STD, mode="crop_flip", **FULL)
    images = random_images()
    on_gpu = augment(images.cuda(), gen(5))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), augment(images, gen(5)), atol=1e-4, rtol=0)
