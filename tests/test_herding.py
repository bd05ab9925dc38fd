import torch

from utils.herding import WELLING_MAX_ITERATIONS, budget_prefix, herding_order, welling_herding_order


def test_herding_known_answer():
    # Class mean of the normalised features is (0.6, 0.8)-ish; the sample nearest the mean is picked
    # first, then the one that brings the 2-sample mean closest to it.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    mu = torch.nn.functional.normalize(feats, dim=1).mean(0)   # (0.6, 0.6)
    order = herding_order(feats)
    # By hand: k=1: distances to mu of each sample: [1,0]->0.721, [0,1]->0.721, [.6,.8]->0.2, [.8,.6]->0.2
    # tie broken by the lower index -> 2. k=2: (f2+f_i)/2: i=3 -> (0.7,0.7) dist 0.141; i=0 -> (0.8,0.4) 0.283;
    # i=1 -> (0.3, 0.9) 0.424 -> 3. k=3: (1.4+f)/3,(1.4+f)/3: i=0 -> (.8,.467) dist .24; i=1 -> (.467,.8) .24 -> 0.
    assert order.tolist() == [2, 3, 0, 1]
    assert torch.allclose(mu, torch.tensor([0.6, 0.6]))


def test_herding_picks_distinct_and_respects_max():
    torch.manual_seed(0)
    feats = torch.randn(50, 8)
    order = herding_order(feats, max_picks=20)
    assert len(order) == 20 and len(set(order.tolist())) == 20
    full = herding_order(feats)
    assert sorted(full.tolist()) == list(range(50))
    assert full[:20].tolist() == order.tolist()


def test_herding_mean_approaches_class_mean():
    torch.manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    mu = feats.mean(0)
    order = herding_order(feats, max_picks=20)
    herd_err = (feats[order].mean(0) - mu).norm()
    rand_err = torch.stack([(feats[torch.randperm(200)[:20]].mean(0) - mu).norm() for _ in range(50)]).mean()
    assert herd_err < 0.5 * rand_err


def test_budget_prefix():
    assert budget_prefix(torch.tensor([1.0, 1.0, 1.0]), 2) == 2
    assert budget_prefix(torch.tensor([0.25] * 10), 2) == 8          # exact sums count
    assert budget_prefix(torch.tensor([0.5, 1.0, 0.25]), 1.4) == 1   # next pick would exceed: stop
    assert budget_prefix(torch.tensor([0.5, 1.0, 0.25]), 1.6) == 2
    assert budget_prefix(torch.tensor([]), 5) == 0


def test_welling_herding_known_answer_repicks_and_stops_at_the_iteration_cap():
    """Exact in binary: features e0, e0, e1, e2; μ = (1/2, 1/4, 1/4). By hand, w: μ -> pick 0 (ties
    with 1: the lower index); (0, 1/2, 1/2) -> 2; (1/2, -1/4, 3/4) -> 3; (1, 0, 0) -> 0 again (kept at
    its first place); μ again, and the cycle 0, 2, 3 repeats: sample 1 is never reached, and the 1000
    iterations end with 3 of the 4 picks asked for. The distinct variant picks 1 last."""
    feats = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert welling_herding_order(feats).tolist() == [0, 2, 3]
    assert herding_order(feats).tolist() == [0, 2, 3, 1]
    assert welling_herding_order(feats, max_picks=2).tolist() == [0, 2]
    assert welling_herding_order(feats, max_iterations=3).tolist() == [0, 2, 3]
    assert welling_herding_order(feats, max_iterations=2).tolist() == [0, 2]
    assert WELLING_MAX_ITERATIONS == 1000


def test_welling_herding_equals_distinct_herding_until_a_sample_is_picked_again():
    """On normalised features ⟨w_k, f⟩ with w_k = (k+1)μ − Σ picked is the distinct variant's
    criterion, so the two orders agree up to Welling's first re-pick; on spread-out random features
    that is many picks later."""
    torch.manual_seed(2)
    feats = torch.randn(300, 32)
    welling, distinct = welling_herding_order(feats, max_picks=10), herding_order(feats, max_picks=10)
    assert welling.tolist() == distinct.tolist()
    assert len(set(welling_herding_order(feats, max_picks=40).tolist())) == 40
