"""Why the CNN student pools before its ReLU and, on the CPU, channels-last: its two ReLU + max-pool
blocks on MNIST-sized activations (batch 128), timed side by side in three layouts, as a forward
without autograd (evaluation, validation forwards, JVPs) and as forward + backward (training).
Ratios are to round 1's layout (NCHW, ReLU then pool). The values agree in all three layouts
(ReLU and max-pooling commute); ``tests/test_components.py`` checks the student against round 1's.

    python benchmarks/cnn_layout.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_ratios, interleaved, machine, save  # noqa: E402

SHAPES = ((128, 32, 28, 28), (128, 64, 14, 14))  # the CNN's two conv outputs on MNIST, batch 128
LAYOUTS = {
    "NCHW, relu then pool": lambda h: F.max_pool2d(F.relu(h), 2),
    "NCHW, pool then relu": lambda h: F.relu(F.max_pool2d(h, 2)),
    "channels-last, pool then relu": lambda h: F.relu(F.max_pool2d(h.contiguous(memory_format=torch.channels_last), 2)),
}


def candidates(block, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> dict:
    """The block on both activations, without autograd and with a backward."""

    def forward() -> None:
        with torch.no_grad():
            for h in inputs:
                block(h)

    def training() -> None:
        for h, g in zip(inputs, grads):
            block(h).backward(g)

    return {"forward": forward, "forward + backward": training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    grads = [torch.randn(s[0], s[1], s[2] // 2, s[3] // 2, generator=generator) for s in SHAPES]
    reference = [F.max_pool2d(F.relu(h), 2) for h in inputs]
    assert all(torch.equal(block(h), r) for block in LAYOUTS.values() for h, r in zip(inputs, reference))
    timed = {}
    for layout, block in LAYOUTS.items():
        for mode, fn in candidates(block, inputs, grads).items():
            timed[f"{mode}: {layout}"] = fn
    timings = interleaved(timed, args.calls, args.rounds, torch.device("cpu"))
    for mode in ("forward", "forward + backward"):
        add_ratios(
            {f"{mode}: {layout}": timings[f"{mode}: {layout}"] for layout in LAYOUTS},
            f"{mode}: NCHW, relu then pool",
            "ratio_to_round1",
        )
        for layout in LAYOUTS:
            t = timings[f"{mode}: {layout}"]
            print(f"{mode:20s} {layout:32s} {t['ms']:7.2f} ms  x{t['ratio_to_round1']:.2f}")
    if not args.no_save:
        print("saved", save("cnn_layout", {"machine": machine(torch.device("cpu")), "shapes": SHAPES, "timings": timings}))


if __name__ == "__main__":
    main()
