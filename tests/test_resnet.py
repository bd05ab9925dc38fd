"""Backbones: shapes, activation sites, cosine variants, channels_last, torchvision equivalence."""
import pytest
import torch
import torchvision
from torch import nn

from convs.activation import Activation, activation_sites
from convs.registry import backbone_names, create_backbone
from utils.errors import ConfigError

# name -> (input side, out_dim, fmap side). CPU-cheap sizes; the ImageNet stem divides by 32.
EXPECTED = {
    "resnet32": (32, 64, 8),
    "resnet20": (32, 64, 8),
    "resnet18_small": (32, 512, 4),
    "resnet34_small": (32, 512, 4),
    "resnet18": (64, 512, 2),
    "resnet34": (64, 512, 2),
}
EXPECTED.update({f"cosine_{k}": v for k, v in list(EXPECTED.items())})

SITES = {"resnet32": 1 + 2 * 15, "resnet20": 1 + 2 * 9, "resnet18": 17, "resnet34": 1 + 2 * 16,
         "resnet18_small": 17, "resnet34_small": 33}


def test_registered_names():
    assert backbone_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_and_sites(name):
    torch.manual_seed(0)
    side, out_dim, fside = EXPECTED[name]
    net = create_backbone(name).eval()
    assert net.out_dim == out_dim
    with torch.no_grad():
        out = net(torch.randn(2, 3, side, side))
    assert out["fmap"].shape == (2, out_dim, fside, fside)
    assert out["features"].shape == (2, out_dim)
    torch.testing.assert_close(out["features"], out["fmap"].mean(dim=(2, 3)))
    plain = name.removeprefix("cosine_")
    sites = activation_sites(net)
    assert len(sites) == SITES[plain] - (plain != name)
    assert len({id(s) for s in sites}) == len(sites)  # one instance per site


def test_small_stem_at_64px():
    net = create_backbone("resnet18_small").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64))["fmap"].shape == (1, 512, 8, 8)


def test_cosine_variant_fmap_can_be_negative():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    plain, cosine = create_backbone("resnet32").eval(), create_backbone("cosine_resnet32").eval()
    with torch.no_grad():
        assert plain(x)["fmap"].min() >= 0
        assert cosine(x)["fmap"].min() < 0
    assert isinstance(cosine.layer3[-1].act2, nn.Identity)
    assert isinstance(cosine.layer3[-2].act2, Activation)


def test_resnet32_is_pycil_sized():
    net = create_backbone("resnet32")
    # PyCIL's resnet32 (option-A shortcuts): 464,154 parameters with a 10-class fc (650).
    assert sum(p.numel() for p in net.parameters()) == 464_154 - 650
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())


def test_cosine_resnet32_has_lucirs_projection_shortcuts():
    """LUCIR's CIFAR network (official modified_resnet_cifar.py, PyCIL's ucir_cifar_resnet) takes 1x1
    conv + BN shortcuts; it was built with resnet32's parameter-free ones (2,752 parameters short)."""
    net = create_backbone("cosine_resnet32")
    assert sum(p.numel() for p in net.parameters()) == 466_256
    for stage in (net.layer2, net.layer3):
        convs = [m for m in stage[0].downsample.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 1 and convs[0].kernel_size == (1, 1) and convs[0].stride == (2, 2)
    assert net.layer1[0].downsample is None or not list(net.layer1[0].downsample.parameters())


@pytest.mark.parametrize("name,tv", [("resnet18", torchvision.models.resnet18),
                                     ("resnet34", torchvision.models.resnet34)])
def test_matches_torchvision(name, tv):
    torch.manual_seed(0)
    ref = tv(weights=None).eval()
    net = create_backbone(name).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    net.load_state_dict(state, strict=True)  # same parameter names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(*list(ref.children())[:-2])
        torch.testing.assert_close(net(x)["fmap"], trunk(x))


@pytest.mark.parametrize("name", ["resnet32", "cosine_resnet18_small"])
def test_channels_last(name):
    torch.manual_seed(0)
    net = create_backbone(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    for key in ("fmap", "features"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-3)  # conv algorithms differ


def test_channels_last_backward():
    net = create_backbone("resnet18_small").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    net(x)["features"].sum().backward()
    assert net.conv1.weight.grad is not None


class _Doubler(nn.Module):
    """Stand-in for a PAU: a learnable elementwise function."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * x


def test_activation_sites_switch_to_pau():
    torch.manual_seed(0)
    net = create_backbone("resnet32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)["fmap"]
    sites = activation_sites(net)
    assert all(s.mode == "relu" and s.pau is None for s in sites)
    for s in sites:
        s.pau = _Doubler()
        s.mode = "pau"
    assert sum(".pau.scale" in k for k in net.state_dict()) == len(sites)
    with torch.no_grad():
        assert net(x)["fmap"].min() < 0  # no ReLU anywhere any more
        for s in sites:
            s.mode = "relu"
        torch.testing.assert_close(net(x)["fmap"], ref)  # switching back restores the CIL net


def test_activation_pau_mode_without_pau_fails():
    site = Activation()
    site.mode = "pau"
    with pytest.raises(RuntimeError):
        site(torch.zeros(1))


def test_unknown_name_and_argument():
    with pytest.raises(ConfigError, match="allowed: cosine_resnet18, .*resnet34_small"):
        create_backbone("resnet50")
    with pytest.raises(ConfigError, match="accepted arguments"):
        create_backbone("resnet18", pretrained=True)
    assert create_backbone("resnet18", last_relu=False).last_relu is False
