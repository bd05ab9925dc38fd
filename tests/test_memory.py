import pytest
import torch

from utils.compression import compress_images, exemplar_cost
from utils.memory import Candidates, ExemplarMemory, candidate_share


def _class_data(c, n=30, size=8):
    g = torch.Generator().manual_seed(c)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) + 100 * c


def _features(images, index=None):
    return images.float().flatten(1)[:, :16]


def _fetch(index, fetched=None):
    """The images at training-set indices (class c's image i has index 100 c + i), as the trainer's fetch."""
    if fetched is not None:
        fetched.extend(index.tolist())
    return torch.stack([_class_data(int(i) // 100)[0][int(i) % 100] for i in index])


def _candidates_of(features=_features, compressor=None, ratio=4.0, shares=1):
    """candidates_of(c) as the trainer builds it: ``candidate_share`` of each of ``shares``
    contiguous shares of the class (what that many processes compute), concatenated.
    ``compressor``: one for all, or a list with each share's own (each process has its own)."""
    compressors = compressor if isinstance(compressor, list) else [compressor] * shares

    def of(c):
        images, index = _class_data(c)
        n = len(index)
        parts = [candidate_share(images[rows], index[rows], c, rows, n, features, compress, ratio)
                 for compress, rows in zip(compressors, (slice(n * r // shares, n * (r + 1) // shares)
                                                         for r in range(shares)))]
        boxes = None if compressor is None else torch.cat([b for _, b in parts])
        return Candidates(index, torch.cat([f for f, _ in parts]), boxes, images.shape[-1])
    return of


def _update(mem, new_classes, classes_seen, **candidates):
    mem.update(new_classes, _candidates_of(**candidates), _fetch, classes_seen)


def test_budget_rules():
    m = ExemplarMemory(memory_size=100, memory_per_class=7, fixed_memory=False)
    assert m.class_budget(10) == 10 and m.total_budget(10) == 100
    assert m.class_budget(30) == 3
    f = ExemplarMemory(memory_size=100, memory_per_class=7, fixed_memory=True)
    assert f.class_budget(30) == 7 and f.total_budget(30) == 210


def test_memory_never_exceeds_budget_across_phases_and_shrinks_by_prefix():
    mem = ExemplarMemory(memory_size=40, memory_per_class=0, fixed_memory=False)
    plan = [(0, 2), (2, 5), (5, 8)]
    history = {}
    for lo, hi in plan:
        _update(mem, range(lo, hi), hi)
        st = mem.stats(hi)
        assert st["used"] <= st["budget"]
        assert len(mem) == st["exemplars"] == sum(st["per_class"])
        for c in range(hi):
            idx = mem.classes[c].source_index.tolist()
            assert len(idx) == 40 // hi
            if c in history:   # old classes keep a prefix of their herding order
                assert idx == history[c][:len(idx)]
            history[c] = idx
    images, labels = mem.tensors()
    assert images.shape == (len(mem), 3, 8, 8) and labels.tolist() == sorted(labels.tolist())


def test_costs_let_more_exemplars_fit():
    mem = ExemplarMemory(memory_size=10, memory_per_class=0, fixed_memory=False, compress_ratio=4.0)

    def empty_boxes(images, c, rows, n):       # the whole image downsampled: cost 1/4
        return torch.zeros(len(images), 4, dtype=torch.long)

    _update(mem, range(0, 1), 1, compressor=empty_boxes)
    assert len(mem) == 30            # all 30 fit: 30 * 0.25 = 7.5 <= 10
    _update(mem, range(1, 2), 2, compressor=empty_boxes)
    assert mem.counts(2) == [20, 20]  # 5 units each: 20 * 0.25
    assert mem.used() <= 10


def _random_boxes(n, size, generator):
    y0 = torch.randint(0, size, (n,), generator=generator)
    x0 = torch.randint(0, size, (n,), generator=generator)
    y1 = torch.minimum(y0 + torch.randint(0, size, (n,), generator=generator), torch.tensor(size))
    x1 = torch.minimum(x0 + torch.randint(0, size, (n,), generator=generator), torch.tensor(size))
    return torch.stack([y0, y1, x0, x1], dim=1)


def test_compressed_memory_stays_in_budget_and_stores_compressed_pixels():
    g = torch.Generator().manual_seed(0)
    mem = ExemplarMemory(memory_size=24, memory_per_class=0, fixed_memory=False, compress_ratio=4.0)
    plain = ExemplarMemory(memory_size=24, memory_per_class=0, fixed_memory=False)
    boxes_of = {}

    def boxes(images, c, rows, n):
        boxes_of[c] = _random_boxes(n, images.shape[-1], g)[rows]
        return boxes_of[c]

    history = {}
    for lo, hi in [(0, 2), (2, 4), (4, 6)]:
        _update(mem, range(lo, hi), hi, compressor=boxes)
        _update(plain, range(lo, hi), hi)
        st = mem.stats(hi, image_bytes=3 * 8 * 8)
        assert st["used"] <= st["budget"] + 1e-9
        assert st["exemplars"] > plain.stats(hi)["exemplars"]        # smaller boxes: more exemplars
        # Bytes follow the cost up to the box border: a downsampled pixel is kept whole when any of
        # the 2x2 pixels it stands for lies outside the box (a few % on these 8 px images).
        assert st["bytes"] <= st["bytes_budget"] * 1.1
        assert st["bytes"] == pytest.approx(st["used"] * 3 * 8 * 8, rel=0.15)
        for c in range(hi):
            ex = mem.classes[c]
            assert ex.compressed and ex.images is None
            assert float(ex.costs.double().sum()) <= mem.class_budget(hi) + 1e-9
            # what the memory gives back is exactly the compressed original
            originals, _ = _class_data(c)
            expect = compress_images(originals[ex.source_index - 100 * c], ex.boxes, 4.0)
            assert torch.equal(ex.decode(), expect)
            assert torch.allclose(ex.costs, exemplar_cost(ex.boxes, (8, 8), 4.0))
            idx = ex.source_index.tolist()
            if c in history:
                assert idx == history[c][:len(idx)]              # shrinking keeps a prefix
            history[c] = idx
    other = ExemplarMemory(24, 0, False, 4.0)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.tensors()[0], mem.tensors()[0]) and other.nbytes() == mem.nbytes()


def test_herding_sees_the_compressed_images():
    seen = []
    mem = ExemplarMemory(memory_size=10, memory_per_class=0, fixed_memory=False, compress_ratio=4.0)

    def features(images, index=None):
        seen.append(images.clone())
        return _features(images)

    _update(mem, range(0, 1), 1, features=features,
            compressor=lambda images, c, rows, n: torch.tensor([[2, 6, 2, 6]]).repeat(len(images), 1))
    originals, _ = _class_data(0)
    assert torch.equal(seen[0], compress_images(originals, torch.tensor([[2, 6, 2, 6]]).repeat(30, 1), 4.0))


def test_candidates_computed_in_shares_give_the_memory_of_one_process():
    """What several processes compute (each its contiguous share of a class: boxes drawn for all n
    and sliced, features of its compressed images), gathered, herds the same exemplars as one."""
    def memory(shares):
        mem = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False, compress_ratio=4.0)

        def random_policy(g):   # every share draws for all n, from its process's generator, and keeps its rows
            return lambda images, c, rows, n: _random_boxes(n, images.shape[-1], g)[rows]
        compressors = [random_policy(torch.Generator().manual_seed(3)) for _ in range(shares)]
        for lo, hi in [(0, 2), (2, 4)]:
            mem.update(range(lo, hi), _candidates_of(compressor=compressors, shares=shares), _fetch, hi)
        return mem

    one = memory(1)
    assert len(one) > 12                   # compressed: more than 12 full images fit
    for shares in (2, 3, 40):              # 40 > 30 images: some shares are empty
        assert memory(shares).digest() == one.digest()


def test_only_the_kept_images_are_fetched_and_decide_runs_each_class():
    fetched, decided = [], []
    mem = ExemplarMemory(memory_size=12, memory_per_class=0, fixed_memory=False)

    def decide(add):
        decided.append(add())
        return decided[-1]
    mem.update(range(0, 3), _candidates_of(), lambda index: _fetch(index, fetched), 3, decide=decide)
    assert decided == [4, 4, 4]
    assert sorted(fetched) == sorted(mem.source_indices().tolist())   # 12 of the 90 images
    for c in range(3):
        assert torch.equal(mem.classes[c].images, _class_data(c)[0][mem.classes[c].source_index - 100 * c])


def test_counts_are_counts_not_index_sums():
    mem = ExemplarMemory(memory_size=9, memory_per_class=0, fixed_memory=False)
    _update(mem, range(0, 3), 3)
    assert mem.counts(4) == [3, 3, 3, 0]


def test_state_dict_round_trip():
    mem = ExemplarMemory(memory_size=9, memory_per_class=0, fixed_memory=False)
    _update(mem, range(0, 3), 3)
    other = ExemplarMemory(9, 0, False)
    other.load_state_dict(mem.state_dict())
    a, b = mem.tensors(), other.tensors()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_herding_key_picks_the_order_the_memory_keeps():
    """``herding: welling`` keeps a prefix of Welling's order (utils.herding), ``distinct`` of the
    distinct variant's; a class whose Welling order ends early gets fewer exemplars than its budget."""
    from utils.herding import herding_order, welling_herding_order

    for method, order_of in (("distinct", herding_order), ("welling", welling_herding_order)):
        mem = ExemplarMemory(memory_size=24, memory_per_class=0, fixed_memory=False, herding=method)
        _update(mem, range(0, 3), 3)
        for c in range(3):
            images, index = _class_data(c)
            assert mem.classes[c].source_index.tolist() == index[order_of(_features(images), 9)[:8]].tolist()
    repeats = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])   # test_herding's known answer
    mem = ExemplarMemory(memory_size=4, memory_per_class=0, fixed_memory=False, herding="welling")
    mem.add_class(0, Candidates(torch.arange(4), repeats, None, 8), 4,
                  lambda index: torch.zeros(len(index), 3, 8, 8, dtype=torch.uint8))
    assert mem.classes[0].source_index.tolist() == [0, 2, 3]
