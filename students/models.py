"""Student networks. Each returns ``(logits, hidden)`` where ``hidden`` maps layer names to
per-sample feature vectors ``(N, d)``, ordered from deeper (earlier) to the second-to-last layer.

Convolutional feature maps are globally average-pooled to one vector per sample. All students
work under ``torch.func.functional_call`` (BatchNorm running statistics are ordinary buffers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from students.data import check_name

Hidden = dict[str, torch.Tensor]


def head_input(hidden: Hidden) -> torch.Tensor:
    """The input of the output layer ``head``: the last entry of ``hidden`` for every built-in student
    (meta-gradients through the head alone rely on it, and check it once per student)."""
    return next(reversed(hidden.values()))


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input; fits every dataset."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        if len(hidden) < 2:
            raise ValueError(f"mlp needs at least two hidden layers (internal states read two), got {hidden}")
        sizes = [int(torch.tensor(input_shape).prod())] + list(hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        h, hidden = x.flatten(1), {}
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(h))
            hidden[f"fc{i + 1}"] = h
        return self.head(h), hidden


class CNN(nn.Module):
    """Two conv blocks (conv, max-pool, ReLU) and a fully connected layer; 1-D or 2-D inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (32, 64), fc: int = 128):
        super().__init__()
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(input_shape) == 2 else (nn.Conv2d, nn.MaxPool2d)
        c_in = input_shape[0]
        self.conv1 = conv(c_in, channels[0], 3, padding=1)
        self.conv2 = conv(channels[0], channels[1], 3, padding=1)
        self.pool = pool(2)
        spatial = [s // 4 for s in input_shape[1:]]
        self.fc = nn.Linear(channels[1] * int(torch.tensor(spatial).prod()), fc)
        self.head = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        if x.dim() == 4 and x.device.type == "cpu":
            # a channels-last input makes every map after it channels-last, whose CPU convolution and pooling
            # kernels are faster than NCHW's (benchmarks/cnn_layout.py); a copy, since a one-channel map's layout
            # is ambiguous and ``contiguous`` would keep it
            x = x.clone(memory_format=torch.channels_last)
        h = F.relu(self.pool(self.conv1(x)))  # pooling before the ReLU: the two commute, and the ReLU then
        h = F.relu(self.pool(self.conv2(h)))  # touches a quarter of the values
        conv_features = h.flatten(2).mean(-1)
        penultimate = F.relu(self.fc(h.flatten(1)))
        return self.head(penultimate), {"conv2": conv_features, "fc": penultimate}


class BasicBlock(nn.Module):
    """ResNet basic block with option-A (zero-padded, strided identity) shortcuts, as He et al. for CIFAR."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2), with configurable base width."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        h = self.stem(x)
        h = self.stages[0](h)
        h = self.stages[1](h)
        stage2 = h.mean((2, 3))
        penultimate = self.stages[2](h).mean((2, 3))
        return self.head(penultimate), {"stage2": stage2, "pool": penultimate}


def _needs_images(name: str, input_shape: tuple[int, ...], min_side: int) -> None:
    if len(input_shape) != 3 or min(input_shape[1:]) < min_side:
        raise ValueError(
            f"student {name!r} needs image inputs (C, H, W) with H, W >= {min_side}, but the dataset's "
            f"inputs have shape {input_shape}; use 'mlp' (fits every dataset) or 'cnn'"
        )


def _make_cnn(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    if len(input_shape) not in (2, 3) or min(input_shape[1:]) < 4:
        raise ValueError(
            f"student 'cnn' needs (C, L) signals or (C, H, W) images with sides >= 4, got inputs of shape "
            f"{input_shape}; use 'mlp' (fits every dataset)"
        )
    return CNN(input_shape, num_classes, **kwargs)


def _make_resnet(depth: int) -> Callable[..., nn.Module]:
    def make(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
        _needs_images(f"resnet{depth}", input_shape, min_side=4)
        return CifarResNet(input_shape, num_classes, depth=depth, **kwargs)

    return make


STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": _make_cnn,
    "resnet20": _make_resnet(20),
    "resnet32": _make_resnet(32),
}


def make_student(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build the student ``name`` for inputs of ``input_shape``; refuses students that do not fit."""
    check_name("student", name, list(STUDENTS))
    try:
        return STUDENTS[name](tuple(input_shape), num_classes, **kwargs)
    except (TypeError, RuntimeError) as e:  # an unknown or mistyped constructor argument, or a size torch refuses
        raise ValueError(f"student_kwargs {kwargs} do not fit student {name!r}: {e}") from None
