"""ParamLayout: flat vectors of trainable parameters or float buffers, and back."""

import numpy as np
import pytest
import torch
from torch import nn

from fedcmd.flat import ParamLayout


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def test_parameters_layout_follows_named_parameters_order():
    net = small_net()
    layout = ParamLayout.from_module(net)
    expected = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
    assert list(zip(layout.names, layout.shapes)) == expected
    assert layout.offsets.dtype == np.int64 and layout.tensor_sizes.dtype == np.int64
    np.testing.assert_array_equal(layout.tensor_sizes, [p.numel() for p in net.parameters()])
    assert layout.numel == sum(p.numel() for p in net.parameters()) == layout.offsets[-1]
    theta = layout.flatten(net)
    assert theta.dtype == np.float32 and theta.shape == (layout.numel,)
    np.testing.assert_array_equal(theta, torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy())


def test_frozen_parameters_are_not_in_the_layout():
    net = small_net()
    net[0].bias.requires_grad_(False)
    assert "0.bias" not in ParamLayout.from_module(net).names


def test_buffers_layout_keeps_float_buffers_only():
    layout = ParamLayout.from_module(small_net(), kind="buffers")
    assert layout.names == ("1.running_mean", "1.running_var")  # num_batches_tracked (int64) is left out
    assert layout.numel == 6


def test_load_round_trip_in_place_without_autograd():
    net, other = small_net(0), small_net(1)
    layout = ParamLayout.from_module(net)
    weights_before = net[4].weight
    vec = layout.flatten(other)
    layout.load(net, vec)
    assert net[4].weight is weights_before  # written in place
    np.testing.assert_array_equal(layout.flatten(net), vec)
    assert all(p.requires_grad and p.grad_fn is None for p in net.parameters())
    # torch tensors and read-only arrays (as decoded from messages) load too
    layout.load(net, torch.zeros(layout.numel))
    assert not layout.flatten(net).any()
    vec.flags.writeable = False
    layout.load(net, vec)
    np.testing.assert_array_equal(layout.flatten(net), vec)


def test_flatten_returns_a_copy():
    net = small_net()
    layout = ParamLayout.from_module(net)
    theta = layout.flatten(net)
    theta[:] = 7.0
    assert not np.any(layout.flatten(net) == 7.0)


def test_split_gives_named_views():
    net = small_net()
    layout = ParamLayout.from_module(net)
    theta = layout.flatten(net)
    parts = layout.split(theta)
    assert list(parts) == list(layout.names)
    np.testing.assert_array_equal(parts["4.weight"], net[4].weight.detach().numpy())
    parts["0.bias"][:] = 0.0
    assert not theta[layout.offsets[1] : layout.offsets[2]].any()  # views, not copies


def test_bad_inputs_are_named():
    net = small_net()
    layout = ParamLayout.from_module(net)
    with pytest.raises(ValueError, match="vec has shape"):
        layout.load(net, np.zeros(layout.numel + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="vec has shape"):
        layout.split(np.zeros(3))
    with pytest.raises(ValueError, match="'4.weight' has shape"):
        layout.flatten(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(7, 5)))
    with pytest.raises(ValueError, match="no parameter '0.weight'"):
        layout.flatten(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind must be one of"):
        ParamLayout.from_module(net, kind="grads")
