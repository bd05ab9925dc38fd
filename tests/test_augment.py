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


# ---- the stored form "whole": crops drawn in the original image, applied to its squashed copy ----

def _pattern(height, width):
    """uint8 [3, height, width]: a smooth pattern (periods of tens of pixels) with pure red
    bands over the left and right 15 % of the width (what a centre crop of a landscape loses)."""
    yy, xx = torch.meshgrid(torch.arange(height * 1.0), torch.arange(width * 1.0), indexing="ij")
    img = torch.stack([60 + 50 * torch.sin(xx / 23 + yy / 31), 127 + 100 * torch.cos(xx / 19),
                       127 + 100 * torch.sin(yy / 17)])
    band = int(0.15 * width)
    img[:, :, :band] = torch.tensor([255.0, 0, 0]).view(3, 1, 1)
    img[:, :, width - band:] = torch.tensor([255.0, 0, 0]).view(3, 1, 1)
    return img.round().clamp(0, 255).to(torch.uint8)


def _stored(original, size, whole, tmp_path):
    """The stored form of ``original`` (uint8 [3, h, w]) as the dataset loader makes it."""
    from PIL import Image

    from utils.image_cache import decode_image

    path = tmp_path / f"img_{whole}.png"
    Image.fromarray(original.permute(1, 2, 0).numpy()).save(path)
    image, hw = decode_image(str(path), size, whole=whole)
    assert hw == tuple(original.shape[1:])
    return torch.from_numpy(image)[None]


def test_per_sample_sizes_draw_like_one_size():
    """The per-sample path (whole-stored images) is the one-size rule: same boxes, same stream."""
    g1, g2 = gen(5), gen(5)
    one = sample_resized_crop_boxes(300, 90, 140, (0.08, 1.0), (3 / 4, 4 / 3), g1)
    many = sample_resized_crop_boxes(300, torch.full((300,), 90), torch.full((300,), 140),
                                     (0.08, 1.0), (3 / 4, 4 / 3), g2)
    assert torch.equal(one, many) and torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    for h0, w0, ratio in [(100, 100, (2.0, 3.0)), (50, 200, (3 / 4, 4 / 3)), (200, 50, (3 / 4, 4 / 3))]:
        fallback_one = sample_resized_crop_boxes(2, h0, w0, (1.0, 1.0), ratio, gen())
        fallback_many = sample_resized_crop_boxes(2, torch.tensor([h0, h0]), torch.tensor([w0, w0]),
                                                  (1.0, 1.0), ratio, gen())
        assert torch.equal(fallback_one, fallback_many)


@pytest.mark.parametrize("h0,w0", [(120, 200), (200, 120)])
def test_whole_box_statistics_match_torchvision_on_the_original(h0, w0):
    """Boxes for a whole-stored image follow torchvision's RandomResizedCrop on the ORIGINAL h0 x w0:
    the same distribution of area fraction and aspect ratio (in original pixels)."""
    n = 4000
    ours = sample_resized_crop_boxes(n, torch.full((n,), h0), torch.full((n,), w0), (0.08, 1.0),
                                     (3 / 4, 4 / 3), gen(1)).double()
    torch.manual_seed(2)   # torchvision draws from the global generator
    image = torch.empty(3, h0, w0)
    ref = torch.tensor([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
                       dtype=torch.float64)
    for boxes in (ours, ref):
        top, left, h, w = boxes.unbind(1)
        assert torch.all((top >= 0) & (left >= 0) & (top + h <= h0) & (left + w <= w0))
    stats = []
    for boxes in (ours, ref):
        _, _, h, w = boxes.unbind(1)
        area, log_aspect = h * w / (h0 * w0), torch.log(w / h)
        stats.append(torch.stack([area.mean(), area.std(), log_aspect.mean(), log_aspect.std()]))
    # standard errors at n = 4000: ~0.004 (area), ~0.003 (log aspect)
    assert torch.allclose(stats[0], stats[1], atol=0.02), (stats[0], stats[1])
    _, _, h, w = ours.unbind(1)
    aspect = w / h
    assert aspect.min() > 0.70 and aspect.max() < 1.42   # within ratio (up to pixel rounding), in ORIGINAL pixels


def test_whole_crop_shows_what_torchvision_crops_from_the_original(tmp_path):
    """Same box -> same pixels: our crop of the squashed stored image against torchvision's
    resized_crop of the original, for every box of a batch."""
    original = _pattern(150, 240)
    stored = _stored(original, 96, True, tmp_path).expand(16, -1, -1, -1).contiguous()
    hw = torch.tensor([[150, 240]]).expand(16, 2)
    augment = TrainAugment(64, MEAN, STD, mode="resized_crop", flip=False)
    out = denormalize(augment(stored, gen(4), orig_hw=hw))
    boxes = sample_resized_crop_boxes(16, hw[:, 0], hw[:, 1], augment.scale, augment.ratio, gen(4))
    errors = []
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(original, top, left, h, w, [64, 64], antialias=True).float()
        errors.append((out[b] - ref).abs().mean().item())
    # resampling only (measured max 1.4 grey levels; the stored copy has 96/240 of the original's
    # columns): boxes drawn in the stored square instead would differ by ~40
    assert max(errors) < 3.0, errors


def test_whole_full_box_is_the_whole_image_not_the_centre_square(tmp_path):
    """scale (1, 1) and the original's own aspect: the crop is the whole original (its red side bands
    included), where the stored form "crop" can only give the centre square."""
    original = _pattern(150, 240)
    aspect = 240 / 150
    augment = TrainAugment(64, MEAN, STD, mode="resized_crop", flip=False, scale=(1.0, 1.0), ratio=(aspect, aspect))
    whole = denormalize(augment(_stored(original, 96, True, tmp_path), gen(), orig_hw=torch.tensor([[150, 240]])))[0]
    ref = TF.resize(original, [64, 64], antialias=True).float()
    assert (whole - ref).abs().mean() < 3.0
    red = lambda x: ((x[0] > 200) & (x[1] < 60)).float().mean().item()   # noqa: E731
    assert red(whole) == pytest.approx(0.30, abs=0.05)      # both bands: 2 x 15 % of the width
    crop = denormalize(augment(_stored(original, 96, False, tmp_path), gen()))[0]
    assert red(crop) == 0.0                                  # the centre square never saw them


def test_centre_view_equals_todays_centre_crop(tmp_path):
    from utils.augment import centre_view

    for h0, w0 in [(150, 240), (240, 150), (97, 131)]:
        original = _pattern(h0, w0)
        crop = _stored(original, 64, False, tmp_path).float()
        view = centre_view(_stored(original, 64, True, tmp_path), torch.tensor([[h0, w0]]))
        assert view.shape == crop.shape and view.dtype == torch.uint8
        assert (view.float() - crop).abs().mean() < 2.0   # measured 0.2 - 1.2; the squashed image: 20 - 50
    # a square original (or a (0, 0) row: "as stored") is left exactly as it is; None: no-op
    images = random_images(2, 16)
    assert torch.equal(centre_view(images, torch.tensor([[50, 50], [0, 0]])), images)
    assert centre_view(images, None) is images


def test_whole_sizes_need_resized_crop():
    augment = TrainAugment(16, MEAN, STD, mode="crop_flip")
    with pytest.raises(ValueError, match="resized_crop"):
        augment(random_images(2, 16), gen(), orig_hw=torch.tensor([[20, 30], [30, 20]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_whole_form_matches_cpu():
    from utils.augment import centre_view

    augment = TrainAugment(24, MEAN, STD, mode="resized_crop", **FULL)
    images = random_images(16, 32)
    hw = torch.stack([torch.randint(20, 90, (16,), generator=gen(1)), torch.randint(20, 90, (16,), generator=gen(2))], 1)
    on_gpu = augment(images.cuda(), gen(5), hw.cuda())
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), augment(images, gen(5), hw), atol=1e-4, rtol=0)
    view = centre_view(images.cuda(), hw.cuda())
    assert view.is_cuda and (view.cpu().float() - centre_view(images, hw).float()).abs().max() <= 1
