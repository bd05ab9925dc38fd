import torch

from utils.herding import budget_prefix, herding_order


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
