"""Cost of the environment: one ``Teaching-v0`` step (uniform weights, observations on) against one
step of a plain PyTorch training loop on the same student, data and batch size, measured side by
side in one process. Target: env step <= 1.25x the plain step.

    python benchmarks/env_overhead.py [--device cuda] [--dataset mnist1d --student mlp]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA_ROOT, add_ratios, interleaved, machine, plain_training_step, save  # noqa: E402
from envs import env_factory  # noqa: E402
from envs.teaching import resolve_device  # noqa: E402


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
    return {"dataset": dataset, "student": student, "batch_size": batch_size, "timings": timings}


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
        for name, t in r["timings"].items():
            print(
                f"  {name:18s} {t['ms']:7.3f} ms/step  (x{t['ratio_to_plain']:.2f} of plain, rounds x{t['ratio_to_plain_min']:.2f}-{t['ratio_to_plain_max']:.2f})"
            )
    if not args.no_save:
        print("saved", save("env_overhead", result))


if __name__ == "__main__":
    main()
