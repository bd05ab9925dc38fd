"""Known-answer tests for utils/compression.py (CPU, fast)."""

import pytest
import torch

from utils.compression import (
    box_area_fraction,
    class_activation_map,
    compress_images,
    downsample_image,
    downsampled_size,
    exemplar_cost,
    extract_crops,
    mask_box,
    rebuild_compressed,
    soft_compress,
    upsample_cam,
    upsample_nearest,
)


def _images(B=3, H=16, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)


def _blocky(img, k):
    """Top-left pixel of each k×k block, repeated (nearest down/up by an integer factor)."""
    return img[..., ::k, ::k].repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


# ---------------------------------------------------------------- CAM
def test_cam_known_answer():
    f0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    fm = torch.stack([f0, f1])[None]                      # [1, 2, 2, 2]
    w = torch.tensor([[1.0, 2.0]])                        # A = [[1, 4], [3, 6]]
    cam = class_activation_map(fm, w)
    assert cam.shape == (1, 2, 2) and cam.dtype == torch.float32
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.6], [0.4, 1.0]]]))


def test_cam_uses_each_images_own_row_and_no_relu():
    fm = torch.zeros(2, 2, 1, 3)
    fm[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    fm[:, 1, 0] = torch.tensor([3.0, 2.0, 1.0])
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])           # 2nd image: negative activations
    cam = class_activation_map(fm, w)
    torch.testing.assert_close(cam[0, 0], torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(cam[1, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_cam_constant_map_is_zero_not_nan():
    fm = torch.full((2, 4, 3, 3), 2.5)
    w = torch.randn(2, 4)
    cam = class_activation_map(fm, w)
    assert torch.isfinite(cam).all()
    assert (cam == 0).all()
    # A zero weight row also gives a constant map.
    cam2 = class_activation_map(torch.randn(1, 4, 3, 3), torch.zeros(1, 4))
    assert (cam2 == 0).all()


def test_cam_range_and_gradient():
    fm = torch.randn(4, 8, 5, 5, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    cam = class_activation_map(fm, w)
    assert cam.min() >= 0 and cam.max() <= 1
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(4))
    assert torch.allclose(cam.flatten(1).amin(1), torch.zeros(4))
    (cam ** 2).mean().backward()
    assert fm.grad is not None and torch.isfinite(fm.grad).all() and fm.grad.abs().sum() > 0
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_cam_gradient_constant_map_finite():
    fm = torch.ones(1, 2, 3, 3, requires_grad=True)
    cam = class_activation_map(fm, torch.tensor([[1.0, -1.0]]))
    cam.sum().backward()
    assert torch.isfinite(fm.grad).all()


# ---------------------------------------------------------------- mask_box
def test_mask_box_same_size_block():
    cam = torch.zeros(1, 8, 10)
    cam[0, 2:4, 4:7] = 1.0                                # 2×3 block of ones
    box = mask_box(cam, (8, 10), 0.6)
    assert box.dtype == torch.int64 and box.shape == (1, 4)
    assert box.tolist() == [[2, 4, 4, 7]]


def test_mask_box_threshold_respected():
    cam = torch.full((1, 8, 10), 0.5)
    cam[0, 2:4, 4:7] = 0.7
    cam[0, 6, 1] = 0.6                                    # == threshold: not kept (strict >)
    assert mask_box(cam, (8, 10), 0.6).tolist() == [[2, 4, 4, 7]]
    assert mask_box(cam, (8, 10), 0.55).tolist() == [[2, 7, 1, 7]]
    assert mask_box(cam, (8, 10), 0.4).tolist() == [[0, 8, 0, 10]]
    assert mask_box(cam, (8, 10), 0.7).tolist() == [[0, 0, 0, 0]]


def test_mask_box_bilinear_upsampling_known_answer():
    # 2×2 -> 4×4 bilinear, align_corners=False: the weight of source row/col 0 along each axis is
    # r = [1, .75, .25, 0], so up[y, x] = r[y] * r[x] for cam = [[1, 0], [0, 0]].
    cam = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    r = torch.tensor([1.0, 0.75, 0.25, 0.0])
    torch.testing.assert_close(upsample_cam(cam, (4, 4))[0], r[:, None] * r[None, :])
    assert mask_box(cam, (4, 4), 0.5).tolist() == [[0, 2, 0, 2]]    # 1, .75, .75, .5625
    assert mask_box(cam, (4, 4), 0.6).tolist() == [[0, 2, 0, 2]]    # 1, .75, .75
    assert mask_box(cam, (4, 4), 0.8).tolist() == [[0, 1, 0, 1]]    # 1
    assert mask_box(cam, (4, 4), 0.1).tolist() == [[0, 3, 0, 3]]    # r > 0 on 0..2


def test_mask_box_empty_and_batch():
    cams = torch.zeros(4, 6, 6)
    cams[0, 0:1, 0:1] = 1.0
    cams[1, 5:6, 2:6] = 1.0
    cams[2] = class_activation_map(torch.ones(1, 3, 6, 6), torch.ones(1, 3))[0]  # all zeros
    cams[3, 1:5, 3] = 0.9
    cams[3, 2, 0] = 0.9
    boxes = mask_box(cams, (6, 6), 0.6)
    assert boxes.tolist() == [[0, 1, 0, 1], [5, 6, 2, 6], [0, 0, 0, 0], [1, 5, 0, 4]]


def test_mask_box_accepts_grad_tensor():
    cam = torch.rand(2, 4, 4, requires_grad=True)
    boxes = mask_box(cam, (8, 8), 0.6)
    assert not boxes.requires_grad and boxes.shape == (2, 4)


# ---------------------------------------------------------------- compress_images
def test_compress_inside_identical_outside_blocky_ratio4():
    imgs = _images(B=2, H=16, W=20)
    boxes = torch.tensor([[3, 9, 5, 12], [0, 16, 0, 1]])
    out = compress_images(imgs, boxes, 4.0)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape
    coarse = _blocky(imgs, 2)
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        inside = torch.zeros(16, 20, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[i][:, inside], imgs[i][:, inside])
        assert torch.equal(out[i][:, ~inside], coarse[i][:, ~inside])
    # Equals the nearest down/up image outside.
    nearest = upsample_nearest(downsample_image(imgs, 4.0), (16, 20))
    assert torch.equal(nearest, coarse)


def test_compress_empty_box_every_2x2_block_constant():
    imgs = _images(B=2, H=8, W=12)
    out = compress_images(imgs, torch.zeros(2, 4, dtype=torch.int64), 4.0)
    blocks = out.view(2, 3, 4, 2, 6, 2)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()
    assert torch.equal(out, _blocky(imgs, 2))


def test_compress_ratio16_gives_4x4_blocks():
    imgs = _images(B=1, H=16, W=16)
    assert downsample_image(imgs, 16.0).shape == (1, 3, 4, 4)
    out = compress_images(imgs, torch.zeros(1, 4, dtype=torch.int64), 16)
    assert torch.equal(out, _blocky(imgs, 4))
    assert not torch.equal(out, _blocky(imgs, 2))


def test_compress_full_box_and_ratio_one_identity():
    imgs = _images(B=2, H=10, W=14)
    full = torch.tensor([[0, 10, 0, 14]] * 2)
    assert torch.equal(compress_images(imgs, full, 4.0), imgs)
    some = torch.tensor([[1, 3, 2, 5], [0, 0, 0, 0]])
    assert torch.equal(compress_images(imgs, some, 1.0), imgs)
    with pytest.raises(ValueError):
        compress_images(imgs, some, 0.5)


def test_downsampled_size_rule():
    assert downsampled_size((224, 224), 4.0) == (112, 112)
    assert downsampled_size((32, 32), 16.0) == (8, 8)
    assert downsampled_size((224, 224), 2.0) == (158, 158)     # 224 / 1.414 = 158.39
    assert downsampled_size((1, 3), 100.0) == (1, 1)           # never below 1
    imgs = _images(B=1, H=7, W=9)
    assert downsample_image(imgs, 4.0).shape[-2:] == downsampled_size((7, 9), 4.0)
    out = compress_images(imgs, torch.tensor([[1, 4, 2, 6]]), 4.0)   # odd sizes work
    assert out.shape == imgs.shape and torch.equal(out[0, :, 1:4, 2:6], imgs[0, :, 1:4, 2:6])


# ---------------------------------------------------------------- cost
def test_exemplar_cost_formula():
    boxes = torch.tensor([[0, 10, 0, 20], [0, 0, 0, 0], [0, 5, 0, 10], [2, 4, 3, 8],
                          [5, 5, 0, 20]])
    cost = exemplar_cost(boxes, (10, 20), 4.0)
    assert cost.dtype == torch.float32 and cost.shape == (5,)
    a = torch.tensor([1.0, 0.0, 0.25, 10 / 200, 0.0])
    torch.testing.assert_close(box_area_fraction(boxes, (10, 20)), a)
    torch.testing.assert_close(cost, a + (1 - a) / 4)
    assert cost[0].item() == 1.0 and cost[1].item() == 0.25 and cost[4].item() == 0.25
    torch.testing.assert_close(exemplar_cost(boxes[2:3], (10, 20), 16.0),
                               torch.tensor([0.25 + 0.75 / 16]))


# ---------------------------------------------------------------- storage / rebuild
@pytest.mark.parametrize("ratio", [1.0, 2.0, 4.0, 16.0])
def test_rebuild_equals_compress(ratio):
    imgs = _images(B=5, H=24, W=20, seed=3)
    boxes = torch.tensor([[0, 24, 0, 20], [0, 0, 0, 0], [3, 11, 7, 19], [23, 24, 0, 1],
                          [5, 6, 2, 20]])
    small = downsample_image(imgs, ratio)
    crops = extract_crops(imgs, boxes)
    for c, (y0, y1, x0, x1) in zip(crops, boxes.tolist()):
        assert c.shape == (3, y1 - y0, x1 - x0) and c.dtype == torch.uint8
        assert c.is_contiguous() and c.untyped_storage().nbytes() == c.numel()
    expected = compress_images(imgs, boxes, ratio)
    rebuilt = rebuild_compressed(small, crops, boxes, (24, 20))
    assert rebuilt.dtype == torch.uint8 and torch.equal(rebuilt, expected)
    # A list of per-exemplar small images works too.
    rebuilt2 = rebuild_compressed(list(small), crops, boxes, (24, 20))
    assert torch.equal(rebuilt2, expected)
    if ratio == 1.0:       # rebuilding must not write into the stored small images
        assert torch.equal(small, imgs)


def test_rebuild_checks_crop_shape():
    imgs = _images(B=1, H=8, W=8)
    boxes = torch.tensor([[0, 4, 0, 4]])
    with pytest.raises(ValueError):
        rebuild_compressed(downsample_image(imgs, 4), [imgs[0, :, :3, :4]], boxes, (8, 8))


# ---------------------------------------------------------------- soft_compress
def test_soft_compress_limits_and_gradient():
    x = torch.rand(2, 3, 8, 8)
    x_eta = _blocky(x, 2)
    torch.testing.assert_close(soft_compress(x, torch.ones(2, 8, 8), 4.0), x)
    torch.testing.assert_close(soft_compress(x, torch.zeros(2, 1, 8, 8), 4.0), x_eta)
    c = torch.full((2, 1, 8, 8), 0.25, requires_grad=True)
    out = soft_compress(x, c, 4.0)
    torch.testing.assert_close(out, 0.25 * x + 0.75 * x_eta)
    out.sum().backward()
    torch.testing.assert_close(c.grad, (x - x_eta).sum(1, keepdim=True))


def test_soft_compress_through_cam_is_differentiable():
    fm = torch.randn(2, 4, 4, 4, requires_grad=True)
    cam = class_activation_map(fm, torch.randn(2, 4))
    x = torch.rand(2, 3, 16, 16)
    out = soft_compress(x, upsample_cam(cam, (16, 16)), 4.0)
    out.pow(2).mean().backward()
    assert torch.isfinite(fm.grad).all() and fm.grad.abs().sum() > 0


# ---- packed storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,ratio", [(32, 4.0), (33, 4.0), (64, 2.0), (30, 9.0), (17, 3.0), (16, 1.0)])
def test_encode_decode_is_compress_images_bit_for_bit(size, ratio):
    from utils.compression import decode_compressed, encode_compressed, stored_pixel_counts

    g = torch.Generator().manual_seed(size)
    n = 40
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y0 = torch.randint(0, size, (n,), generator=g)
    x0 = torch.randint(0, size, (n,), generator=g)
    y1 = torch.minimum(y0 + torch.randint(0, size, (n,), generator=g), torch.tensor(size))
    x1 = torch.minimum(x0 + torch.randint(0, size, (n,), generator=g), torch.tensor(size))
    boxes = torch.stack([y0, y1, x0, x1], dim=1)
    boxes[0] = torch.tensor([0, 0, 0, 0])
    boxes[1] = torch.tensor([0, size, 0, size])
    box_px, small_px = encode_compressed(x, boxes, ratio)
    assert torch.equal(decode_compressed(box_px, small_px, boxes, (size, size), ratio), compress_images(x, boxes, ratio))
    crop, small = stored_pixel_counts(boxes, (size, size), ratio)
    assert crop.sum() == box_px.shape[0] and small.sum() == small_px.shape[0]
    h, w = downsampled_size((size, size), ratio)
    assert small[0] == h * w and crop[0] == 0            # empty box: the whole small image
    assert small[1] == 0 and crop[1] == size * size      # full box: the crop only
    # stored pixels follow the cost formula up to the box border
    stored = (crop + small).float() / (size * size)
    assert stored.mean().item() == pytest.approx(exemplar_cost(boxes, (size, size), ratio).mean().item(), abs=0.03)


def test_needed_small_pixels_known_answer():
    from utils.compression import needed_small_pixels

    # 8x8 image, ratio 4 -> 4x4 small image; box rows 2..5, cols 2..5 covers small pixels (1..2, 1..2)
    need = needed_small_pixels(torch.tensor([[2, 6, 2, 6]]), (8, 8), 4.0)[0]
    expect = torch.ones(4, 4, dtype=torch.bool)
    expect[1:3, 1:3] = False
    assert torch.equal(need, expect)
    # a box on odd borders keeps the partly covered small pixels
    need = needed_small_pixels(torch.tensor([[1, 6, 2, 6]]), (8, 8), 4.0)[0]
    assert need[:, 1].tolist() == [True, False, False, True]   # small row 0 covers image rows 0 (out) and 1 (in)
