"""Shared helpers of the benchmarks: machine description, synchronised timing, interleaved rounds."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine(device: torch.device) -> dict:
    """Hardware, versions and date, stated in every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": str(torch.__version__),
        "device": str(device),
    }  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall time of ``fn`` over ``calls`` calls, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def interleaved(candidates: dict[str, Callable[[], object]], calls: int, rounds: int, device: torch.device) -> dict[str, dict]:
    """Time each candidate in ``rounds`` alternating rounds (so drifts of a noisy machine hit all
    alike); median and spread of the per-round means, in milliseconds, and the per-round means
    themselves (``round_ms``, which ``add_ratios`` pairs by round)."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up (allocator, lazy init, first-use compilation)
        seconds_per_call(fn, max(1, calls // 4), device)
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(1e3 * seconds_per_call(fn, calls, device))
    return {
        name: {"ms": statistics.median(v), "ms_min": min(v), "ms_max": max(v), "rounds": rounds, "calls": calls, "round_ms": v}
        for name, v in samples.items()
    }


def add_ratios(timings: dict[str, dict], base: str, key: str) -> None:
    """Set ``timings[name][key]`` to the median over rounds of each round's time divided by ``base``'s
    in the same round (and ``key``_min / _max): a pair timed seconds apart shares the machine's
    state, so a slow spell of a noisy machine cancels out instead of landing on one side."""
    for t in timings.values():
        ratios = [ms / ref for ms, ref in zip(t["round_ms"], timings[base]["round_ms"])]
        t[key], t[f"{key}_min"], t[f"{key}_max"] = statistics.median(ratios), min(ratios), max(ratios)


def plain_training_step(env: gym.Env, student: str, batch_size: int, device: torch.device) -> Callable[[], None]:
    """One step of a plain PyTorch loop (module forward, backward, torch.optim.SGD) on the env's
    data and student architecture: the baseline every ratio is measured against."""
    from torch.nn import functional as F

    from students.models import make_student

    data, labels = env.unwrapped.data, env.unwrapped.handle.pool.y
    model = make_student(student, data.input_shape, data.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(data.train), (batch_size,), generator=generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(data.train.x[idx])
        F.cross_entropy(logits, labels[idx]).backward()
        optimizer.step()

    return step


def save(name: str, payload: dict) -> Path:
    """Write ``payload`` to benchmarks/results/<name>-<device>-<date>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = payload["machine"]["date"][:10]
    path = RESULTS / f"{name}-{payload['machine']['device'].split(':')[0]}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
