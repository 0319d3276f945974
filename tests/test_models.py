import pytest
import torch

from fedcmd.models import MODELS, build_model, count_parameters


@pytest.mark.parametrize(
    "name, in_shape, num_classes, expected",
    [
        ("lenet5", (1, 28, 28), 10, 61_706),
        ("lenet5", (3, 32, 32), 10, 62_006),
        ("simplenet", (3, 32, 32), 10, 94_890),
        ("simplenet", (3, 32, 32), 1, 94_305),  # the paper's "SimpleNet2", "94,000 parameters"
        ("resnet18", (3, 32, 32), 10, 11_173_962),
        ("mlp", (1, 28, 28), 10, 50_890),
    ],
)
def test_parameter_counts(name, in_shape, num_classes, expected):
    assert count_parameters(build_model(name, in_shape, num_classes)) == expected


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_forward_shapes(name, in_shape):
    model = build_model(name, in_shape, num_classes=7).eval()
    with torch.no_grad():  # one image: ResNet-18 costs ~0.5 GFLOP per 32x32 image
        assert model(torch.randn(1, *in_shape)).shape == (1, 7)


def test_lenet5_layers_on_28x28():
    convs = [m for m in build_model("lenet5").modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].padding == (2, 2) and convs[0].in_channels == 1
    fc = [m for m in build_model("lenet5").modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(400, 120), (120, 84), (84, 10)]
    convs32 = [m for m in build_model("lenet5", (3, 32, 32)).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs32[0].padding == (0, 0) and convs32[0].in_channels == 3


def test_init_is_deterministic():
    torch.manual_seed(5)
    a = build_model("lenet5")
    torch.manual_seed(5)
    b = build_model("lenet5")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    state = torch.get_rng_state()
    c = build_model("lenet5", seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # seed= leaves the global RNG alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    d = build_model("lenet5", seed=6)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


def test_unknown_model_names_valid_ones():
    with pytest.raises(ValueError, match="lenet5, simplenet, resnet18, mlp"):
        build_model("vgg16")


def test_in_shape_must_be_chw():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("mlp", (28, 28))
