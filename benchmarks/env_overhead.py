"""Cost of the environment: one ``Teaching-v0`` step (uniform weights, observations on) against one
step of a plain PyTorch training loop on the same student, data and batch size, measured side by
side in one process, and the step's parts timed the same way: the functional forward of a batch,
forward plus the weighted update, and the surface and internal-state features on a forwarded batch
(what bounds the step where it misses its target), and the two largest ops of the internal features,
the k-nearest-neighbour cosines and top-k, each alone; and the gradient of the clean validation loss on a
batch of the same size (teach_step.py's validation batch), the least each B = 1 meta step through all layers
adds to the env step. Targets: env step <= 1.25x the plain step on cnn / MNIST and <= 1.5x on mlp /
mnist1d (the default here); meta_grad at B = 1 <= 2.5x on cnn / MNIST and <= 3x on mlp / mnist1d.

    python benchmarks/env_overhead.py [--device cuda] [--dataset mnist1d --student mlp]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA_ROOT, add_ratios, interleaved, machine, plain_training_step, save  # noqa: E402
from envs import env_factory  # noqa: E402
from envs.observation import NEIGHBOURS, has_direction, nearest_neighbours, neighbour_similarity, unit_directions  # noqa: E402
from envs.teaching import TeachingEnv, resolve_device  # noqa: E402


def measure(dataset: str, student: str, batch_size: int, device: torch.device, calls: int, rounds: int) -> dict:
    make = lambda tensor_obs: env_factory(
        dataset=dataset, student=student, batch_size=batch_size, horizon=10**9, eval_every=10**9, device=str(device),
        data_root=str(DATA_ROOT), tensor_obs=tensor_obs, disable_env_checker=True,
    )()  # fmt: skip
    env_tensor, env_numpy = make(True), make(False)
    env_tensor.reset(seed=0)
    env_numpy.reset(seed=0)
    ones = torch.ones(batch_size, device=device)
    plain_step = plain_training_step(env_tensor, student, batch_size, device)
    timings = interleaved(
        {"plain loop": plain_step, "env (tensor obs)": lambda: env_tensor.step(ones), "env (numpy obs)": lambda: env_numpy.step(ones.cpu().numpy())},
        calls, rounds, device,
    )  # fmt: skip
    add_ratios(timings, "plain loop", "ratio_to_plain")
    parts = interleaved(step_parts(env_tensor.unwrapped, ones), calls, rounds, device)
    add_ratios(parts, "plain loop", "ratio_to_plain")
    return {"dataset": dataset, "student": student, "batch_size": batch_size, "timings": timings, "parts": parts}


def step_parts(env: TeachingEnv, ones: torch.Tensor, batches: int = 16) -> dict:
    """The env step's main parts as closures on ``env`` (its sampler's batches, its handle, its feature
    builder), beside a plain step of its own, each run alone. The features are computed on ``batches``
    batches forwarded beforehand, in turn (on one batch over and over, top-k would meet the same data)."""
    handle, features = env.handle, env.features
    indices = env.sampler.next()

    def update() -> None:
        handle.forward_batch(indices)
        handle.update(ones, differentiable=False)

    forwarded = []
    for _ in range(batches):
        batch = env.sampler.next()
        logits, hidden, labels = handle.forward_batch(batch)
        forwarded.append((batch, logits.detach(), [h.detach() for h in hidden.values()], labels))
    turns = itertools.cycle(forwarded)

    def surface() -> None:
        batch, logits, _, labels = next(turns)
        features.samples(logits, labels, batch)

    def internal() -> None:
        _, _, hidden, labels = next(turns)
        features.internal(hidden, labels)

    # the k-nearest-neighbour agreement's two largest ops on their own: the batch's cosine matrices and top-k
    directions = [unit_directions([h.float().flatten(1) for h in hidden[-2:]]) for _, _, hidden, _ in forwarded]
    similarities = [neighbour_similarity(unit, has_direction(norm)) for unit, norm in directions]
    unit_turns, similarity_turns = itertools.cycle(directions), itertools.cycle(similarities)

    val_indices = handle.val_indices(len(ones))

    def validation_gradient() -> None:
        torch.autograd.grad(handle.val_loss(handle.params, val_indices), list(handle.params.values()))

    def similarity() -> None:
        unit, norm = next(unit_turns)
        neighbour_similarity(unit, has_direction(norm))

    return {
        "plain loop": plain_training_step(env, env.student_name, len(ones), ones.device),
        "forward": lambda: handle.forward_batch(indices),
        "forward + update": update,
        "surface features": surface,
        "internal features": internal,
        "  of which kNN cosines": similarity,
        "  of which kNN top-k": lambda: nearest_neighbours(next(similarity_turns), NEIGHBOURS),
        "validation gradient": validation_gradient,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--student", default="mlp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    result = {
        "machine": machine(device),
        "results": [measure(args.dataset, args.student, args.batch_size, device, args.calls, args.rounds)],
    }
    for r in result["results"]:
        print(f"{r['dataset']}/{r['student']} batch {r['batch_size']} on {device}:")
        for name, t in [*r["timings"].items(), *(("part: " + k, v) for k, v in r["parts"].items() if k != "plain loop")]:
            print(
                f"  {name:26s} {t['ms']:7.3f} ms/step  (x{t['ratio_to_plain']:.2f} of plain, rounds x{t['ratio_to_plain_min']:.2f}-{t['ratio_to_plain_max']:.2f})"
            )
    if not args.no_save:
        print("saved", save("env_overhead", result))


if __name__ == "__main__":
    main()
