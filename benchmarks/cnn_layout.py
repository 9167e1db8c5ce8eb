"""Why the CNN student pools before its ReLU and, on the CPU, runs channels-last: the whole student
(MNIST-sized input, batch 128) timed side by side in three layouts, as a forward without autograd
(evaluation, validation forwards, JVPs) and as forward + backward (training). Ratios are to round
1's layout (NCHW throughout, ReLU then pool). The logits agree in all three layouts to float32
rounding (ReLU and max-pooling commute; a convolution's summation order depends on the layout);
``tests/test_components.py`` checks the student against round 1's order.

    python benchmarks/cnn_layout.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_ratios, interleaved, machine, save  # noqa: E402
from students.models import make_student  # noqa: E402

BATCH, SHAPE = 128, (1, 28, 28)


def nchw_relu_then_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Round 1: NCHW throughout, the textbook ReLU then max-pool."""
    h = F.max_pool2d(F.relu(model.conv1(x)), 2)
    h = F.max_pool2d(F.relu(model.conv2(h)), 2)
    return head(model, h)


def channels_last_pooling(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """28f31f5 to 1877a6f: each map copied to channels-last for pooling, pooled before the ReLU. The first
    convolution ran NCHW (its one-channel input's layout is ambiguous, so it stayed NCHW), the second
    channels-last (its input is the pooled channels-last map), so the copy did work only after the first."""
    h = F.relu(F.max_pool2d(model.conv1(x).contiguous(memory_format=torch.channels_last), 2))
    h = F.relu(F.max_pool2d(model.conv2(h).contiguous(memory_format=torch.channels_last), 2))
    return head(model, h)


def head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The layers after the convolutions, with the pooled conv features the student also returns."""
    h.flatten(2).mean(-1)
    return model.head(F.relu(model.fc(h.flatten(1))))


LAYOUTS = {
    "NCHW, relu then pool": nchw_relu_then_pool,
    "NCHW first conv, channels-last pool": channels_last_pooling,
    "channels-last throughout (now)": lambda model, x: model(x)[0],
}


def candidates(
    layout: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict:
    """The student in ``layout``, without autograd and with a backward to its parameters."""

    def forward() -> None:
        with torch.no_grad():
            layout(model, x)

    def training() -> None:
        torch.autograd.grad(F.cross_entropy(layout(model, x), y), list(model.parameters()))

    return {"forward": forward, "forward + backward": training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_student("cnn", SHAPE, 10)
    x, y = torch.rand(BATCH, *SHAPE), torch.randint(0, 10, (BATCH,))
    with torch.no_grad():
        reference = nchw_relu_then_pool(model, x)
        for layout in LAYOUTS.values():
            torch.testing.assert_close(layout(model, x), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    timed = {}
    for name, layout in LAYOUTS.items():
        for mode, fn in candidates(layout, model, x, y).items():
            timed[f"{mode}: {name}"] = fn
    timings = interleaved(timed, args.calls, args.rounds, torch.device("cpu"))
    for mode in ("forward", "forward + backward"):
        add_ratios(
            {f"{mode}: {name}": timings[f"{mode}: {name}"] for name in LAYOUTS},
            f"{mode}: NCHW, relu then pool",
            "ratio_to_round1",
        )
        for name in LAYOUTS:
            t = timings[f"{mode}: {name}"]
            print(f"{mode:20s} {name:32s} {t['ms']:7.2f} ms  x{t['ratio_to_round1']:.2f}")
    if not args.no_save:
        payload = {"machine": machine(torch.device("cpu")), "batch": BATCH, "input_shape": SHAPE, "timings": timings}
        print("saved", save("cnn_layout", payload))


if __name__ == "__main__":
    main()
