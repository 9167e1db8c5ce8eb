"""Cost of teaching: a plain student step against one full teaching step (teacher acts, the env
takes the weighted student update, the teacher takes its meta-gradient step) for ``meta_grad``
with B = 1 (by its JVP and by its ``layerwise`` closed form), 3, 5 and through the output layer
only (``--meta-layers head``), ``mwnet`` (by the JVP and by ``layerwise``) and ``l2rw``, side by
side in one process. Milliseconds per student step, ratio to the plain step, peak
GPU memory per teacher (CUDA), and the max RSS of each config's process (each config runs in a
fresh process, so that one config's memory does not count towards another's).

    python benchmarks/teach_step.py                       # CPU: mlp/mnist1d and cnn/MNIST
    python benchmarks/teach_step.py --device cuda         # adds resnet32 on CIFAR-shaped data

Targets (ratio to a plain step, B = 1): meta_grad head <= 1.5x on cnn/MNIST (CPU); meta_grad
<= 2.5x on cnn/MNIST and <= 3x on mlp/mnist1d; the env step alone <= 1.25x on cnn/MNIST and <= 1.5x
on mlp/mnist1d.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import students.data  # noqa: E402
from agents import make_agent  # noqa: E402
from agents.base import agent_class  # noqa: E402
from agents.loop import start, teach  # noqa: E402
from benchmarks.common import DATA_ROOT, add_ratios, interleaved, machine, plain_training_step, save, sync  # noqa: E402
from envs import env_factory  # noqa: E402
from envs.teaching import resolve_device  # noqa: E402

CONFIGS = {
    "mlp/mnist1d": dict(dataset="mnist1d", student="mlp"),
    "cnn/mnist": dict(dataset="mnist", student="cnn"),
    "resnet32/cifar-shaped": dict(dataset="cifar10", student="resnet32"),
}
TEACHERS = {
    "meta_grad B=1": ("meta_grad", {"unroll": 1}),
    "meta_grad B=1 layerwise": ("meta_grad", {"unroll": 1, "method": "layerwise"}),
    "meta_grad head B=1": ("meta_grad", {"unroll": 1, "meta_layers": "head"}),
    "meta_grad head B=1, no alignment": ("meta_grad", {"unroll": 1, "meta_layers": "head", "alignment": False}),
    "meta_grad B=3": ("meta_grad", {"unroll": 3}),
    "meta_grad B=5": ("meta_grad", {"unroll": 5}),
    "mwnet": ("mwnet", {}),
    "mwnet layerwise": ("mwnet", {"method": "layerwise"}),
    "l2rw": ("l2rw", {}),
}


def cifar_shaped(name: str, data_root: str | None, download: bool) -> tuple[np.ndarray, ...]:
    """Random data of CIFAR's shape and size: timing depends on shapes only (CIFAR is not on disk here)."""
    rng = np.random.default_rng(0)
    x = rng.random((50_000, 3, 32, 32), dtype=np.float32)
    return x, rng.integers(0, 10, 50_000), x[:10_000], rng.integers(0, 10, 10_000)


def make_env(config: dict, batch_size: int, device: torch.device, **overrides: Any) -> tuple[gym.Env, dict]:
    env = env_factory(
        **config, batch_size=batch_size, horizon=10**9, eval_every=10**9, device=str(device), data_root=str(DATA_ROOT),
        tensor_obs=True, disable_env_checker=True, **overrides,
    )()  # fmt: skip
    obs, _ = env.reset(seed=0)
    return env, obs


def teaching_step(agent: str, kwargs: dict, config: dict, batch_size: int, device: torch.device) -> Callable[[], Any]:
    """A closure doing one full teaching step (``agents.loop.teach``) on its own env and teacher (the
    env computes what the teacher reads, as in ``evaluate.py``)."""
    env, _ = make_env(config, batch_size, device, **agent_class(agent).env_settings(kwargs))
    teacher = make_agent(agent, **kwargs, val_batch=batch_size).to(device)
    run = start(env, teacher.train(teacher.kind == "online"), seed=0)
    return lambda: teach(run, 1)


def peak_memory(step: Callable[[], Any], calls: int, device: torch.device) -> float | None:
    """Peak GPU memory (MiB) over ``calls`` steps; None on the CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(name: str, batch_size: int, device: torch.device, calls: int, rounds: int) -> dict:
    config = CONFIGS[name]
    candidates = {
        "plain step": plain_training_step(make_env(config, batch_size, device)[0], config["student"], batch_size, device)
    }
    env_ones = make_env(config, batch_size, device)[0]
    ones = torch.ones(batch_size, device=device)
    candidates["env step (uniform)"] = lambda: env_ones.step(ones)
    for label, (agent, kwargs) in TEACHERS.items():
        candidates[label] = teaching_step(agent, kwargs, config, batch_size, device)
    timings = interleaved(candidates, calls, rounds, device)
    add_ratios(timings, "plain step", "ratio_to_plain")
    for label, t in timings.items():
        t["peak_mib"] = peak_memory(candidates[label], min(calls, 10), device)
    return {"config": name, "batch_size": batch_size, "timings": timings}


def measure_in_fresh_process(name: str, batch_size: int, device: str, calls: int, rounds: int) -> dict:
    """``measure`` in this (fresh) process, with its max RSS: run through a one-task process pool."""
    students.data._cifar = cifar_shaped  # noqa: SLF001  (benchmark only: random CIFAR-shaped data)
    result = measure(name, batch_size, torch.device(device), calls, rounds)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)} (default: by device)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--calls", type=int, default=30, help="steps per timing round (a multiple of 15 keeps B=3, 5 windows whole)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    names = args.configs.split(",") if args.configs else (list(CONFIGS) if device.type == "cuda" else list(CONFIGS)[:2])
    results = []
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            r = pool.submit(measure_in_fresh_process, name, args.batch_size, str(device), args.calls, args.rounds).result()
        results.append(r)
        print(f"{name}, batch {args.batch_size}, {device} (max RSS {r['max_rss_mib']:.0f} MiB):")
        for label, t in r["timings"].items():
            memory = f", peak {t['peak_mib']:.0f} MiB" if t["peak_mib"] is not None else ""
            print(
                f"  {label:20s} {t['ms']:8.2f} ms/step  x{t['ratio_to_plain']:.2f} "
                f"(rounds x{t['ratio_to_plain_min']:.2f}-{t['ratio_to_plain_max']:.2f}){memory}"
            )
    payload = {"machine": machine(device), "results": results}
    if not args.no_save:
        print("saved", save("teach_step", payload))


if __name__ == "__main__":
    main()
