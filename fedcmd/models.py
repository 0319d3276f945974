"""Models by name: `build_model("lenet5", in_shape=(1, 28, 28), num_classes=10)`.

Every model takes N x C x H x W float input and returns N x num_classes logits. Parameters are
PyTorch's default initialisation drawn from the global RNG, so `torch.manual_seed(s)` before
`build_model` (or `build_model(..., seed=s)`, which leaves the global RNG alone) fixes them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """Size of `features`' output for one input of `in_shape` (zeros: no RNG is used)."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, as in APF's and CMD's experiments.

    conv 5x5 (6) - pool - conv 5x5 (16) - pool - fc 120 - fc 84 - fc classes. The classic net
    reads 32x32 images: inputs smaller than 32 (28x28 MNIST) get conv1 padding 2, which restores
    the 16x5x5 = 400 features and the 61,706 parameters of the 1x28x28, 10-class model. Other sizes
    build too, with the flatten size computed from `in_shape` (3x32x32: 62,006 parameters).
    """

    def __init__(self, in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = in_shape
        padding = 2 if min(height, width) < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SimpleNet(nn.Module):
    """The small CNN of the 2022 CMD paper (Brokman et al., "Underlying correlated dynamics",
    Fig. 4a), as far as the text tells it.

    The figure itself is not in our copy of the paper. The text says: the net (taken from
    Manojlovic et al. 2020) has "several convolution layers, followed by max-pooling, fully-connected
    (FC) and ReLU activation", and with one output neuron instead of ten ("SimpleNet2", cats vs dogs)
    "a total of 94,000 parameters". The classic small cats-vs-dogs Keras CNN matches this: three
    blocks conv 3x3 (32, 32, 64 channels, 'same' padding) + ReLU + max-pool 2, then fc 64 + ReLU and
    the output layer. On 3x32x32 that is 94,305 parameters with one output (the paper's 94,000) and
    94,890 with ten. The Keras net's dropout is left out: the paper does not mention it, and it would
    make local training depend on an extra RNG stream.
    """

    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = in_shape[0]
        for out_channels in (32, 32, 64):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (the CIFAR variant used by the CMD papers).

    3x3 stem conv, stride 1, no max-pool; BasicBlocks [2, 2, 2, 2] of 64-512 channels; global
    average pool; fc. 11,173,962 parameters for 3 channels and 10 classes. Its BatchNorm layers also
    hold buffers (running mean/var, batch count) that are in the state_dict but are not parameters.
    """

    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks: list[nn.Module] = []
        in_channels = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [
                BasicBlock(in_channels, out_channels, stride),
                BasicBlock(out_channels, out_channels, 1),
            ]
            in_channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


class MLP(nn.Module):
    """flatten - fc 64 - ReLU - fc classes: a tiny model for tests (50,890 parameters on 1x28x28)."""

    def __init__(self, in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        channels, height, width = in_shape
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "lenet5": LeNet5,
    "simplenet": SimpleNet,
    "resnet18": ResNet18,
    "mlp": MLP,
}


def build_model(
    name: str,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    seed: int | None = None,
) -> nn.Module:
    """A fresh model `name` (one of MODELS) for images of `in_shape` (C, H, W).

    With `seed`, the initial parameters are drawn from that seed without touching the global RNG.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
    if seed is None:
        return MODELS[name](in_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](in_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (BatchNorm buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
