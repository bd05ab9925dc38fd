"""The generated dataset: deterministic, well-formed, localised objects, cheap to make."""

import pytest
import torch

from utils import shapes as synth
from utils.datasets import load_dataset
from utils.errors import ConfigError


def test_same_seed_is_bit_identical_and_seeds_and_splits_differ():
    a = synth.generate_split(10, 5, 32, seed=7, split="train")
    b = synth.generate_split(10, 5, 32, seed=7, split="train")
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    other_seed = synth.generate_split(10, 5, 32, seed=8, split="train")
    assert not torch.equal(a.images, other_seed.images)
    test_split = synth.generate_split(10, 5, 32, seed=7, split="test")
    assert not torch.equal(a.images, test_split.images)  # disjoint RNG streams


def test_load_dataset_shapes_dtypes_and_counts():
    d = load_dataset("shapes", None, image_size=32, shapes={"num_classes": 12, "train_per_class": 7,
                                                                  "test_per_class": 3})
    assert d.name == "shapes" and d.image_size == 32 and len(d.class_names) == 12
    assert d.mean == (0.5, 0.5, 0.5) and d.std == (0.25, 0.25, 0.25)
    for split, per_class in ((d.train, 7), (d.test, 3)):
        assert split.images.shape == (12 * per_class, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and split.boxes.dtype == torch.int64
        assert split.boxes.shape == (12 * per_class, 4) and split.paths is None
        assert torch.equal(torch.bincount(split.labels, minlength=12), torch.full((12,), per_class))
        assert len(split) == 12 * per_class


def test_defaults_and_seed_through_load_dataset():
    a = load_dataset("shapes", "ignored", image_size=32, shapes={"seed": 3})
    b = load_dataset("shapes", None, image_size=32, shapes={"seed": 3})
    c = load_dataset("shapes", None, image_size=32)
    assert len(a.train) == 1000 and len(a.test) == 300
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


@pytest.mark.parametrize("size", [8, 32, 64])
def test_boxes_are_tight_around_the_object_and_object_differs_from_background(size):
    s = synth.generate_split(20, 6, size, seed=1, split="train", return_parts=True)
    y0, y1, x0, x1 = s.boxes.unbind(1)
    assert ((0 <= y0) & (y0 < y1) & (y1 <= size) & (0 <= x0) & (x0 < x1) & (x1 <= size)).all()
    for i in range(len(s.labels)):
        m = s.masks[i]
        inside = torch.zeros_like(m)
        inside[y0[i]:y1[i], x0[i]:x1[i]] = True
        assert m.any() and not (m & ~inside).any()  # every object pixel lies in the box...
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == tuple(s.boxes[i].tolist())  # ...tightly
    if size >= 32:
        side = torch.maximum(y1 - y0, x1 - x0).float() / size
        assert side.min() > 0.15 and side.max() < 0.75  # objects of roughly 30-60 % of the side
        # the object really is drawn over the clutter: its pixels differ clearly from the background
        diff = (s.images.float() - s.backgrounds.float()).abs().amax(1)  # [N,S,S]
        per_image = torch.stack([diff[i][s.masks[i]].mean() for i in range(len(s.labels))])
        assert per_image.mean() > 60 and (per_image > 15).float().mean() > 0.95
        outside = diff[~s.masks].mean()
        assert outside < 15  # only the grain (std 0.03) outside the object


def test_class_colour_is_on_the_object_not_in_the_clutter():
    s = synth.generate_split(10, 20, 32, seed=0, split="train", return_parts=True)
    # mean background colour per class: independent of the class (all close to the global mean)
    bg = s.backgrounds.float().mean((2, 3))  # [N,3]
    per_class = torch.stack([bg[s.labels == c].mean(0) for c in range(10)])
    assert (per_class - bg.mean(0)).abs().max() < 25
    # object colour per class: distinct classes have distinct colours (first 10 classes)
    obj = torch.stack([s.images[i].float()[:, s.masks[i]].mean(1) for i in range(len(s.labels))])
    obj_per_class = torch.stack([obj[s.labels == c].mean(0) for c in range(10)])
    dists = torch.cdist(obj_per_class, obj_per_class) + torch.eye(10) * 1e3
    assert dists.min() > 40


def test_many_classes_have_distinct_names_and_attributes():
    names = synth.class_names(synth.MAX_CLASSES)
    assert len(set(names)) == synth.MAX_CLASSES >= 100
    attrs = {synth.class_attributes(c) for c in range(synth.MAX_CLASSES)}
    assert len(attrs) == synth.MAX_CLASSES
    # every 10-class block differs in shape and colour between neighbours
    for c in range(99):
        a, b = synth.class_attributes(c), synth.class_attributes(c + 1)
        assert a[0] != b[0] and a[1] != b[1]
    d = load_dataset("shapes", None, image_size=16, shapes={"num_classes": 200, "train_per_class": 1,
                                                                  "test_per_class": 1})
    assert len(d.class_names) == 200 and d.train.images.shape == (200, 3, 16, 16)


@pytest.mark.parametrize("options", [{"num_classes": 201}, {"num_classes": 1}, {"classes": 10},
                                     {"train_per_class": 0}, {"test_per_class": 2.5}])
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        load_dataset("shapes", None, image_size=32, shapes=options)


def test_a_bad_option_is_named_with_its_json_value():
    with pytest.raises(ConfigError, match=r"'shapes.train_per_class' must be an integer ≥ 1, got null\."):
        load_dataset("shapes", None, image_size=32, shapes={"train_per_class": None})


def test_default_set_is_the_documented_size():
    # (Its speed is not asserted: timing asserts fail on a loaded machine; the set is vectorised.)
    d = load_dataset("shapes", None, image_size=32)
    assert len(d.class_names) == 10 and len(d.train) == 10 * 100 and len(d.test) == 10 * 30
