"""Long-run memory check: resident memory (RSS) of 20,000 env steps and of a 5,000-step meta_grad
run, read after a warm-up and at the end; growth must stay under 5%.

    python benchmarks/soak.py [--env-steps 20000] [--meta-steps 5000]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agents import make_agent  # noqa: E402
from agents.loop import Callback, TeachingRun, start, teach  # noqa: E402
from benchmarks.common import machine, save  # noqa: E402
from envs import env_factory  # noqa: E402

WARMUP_FRACTION = 0.1
EPISODE = 2000  # episodes end and restart during the soak, so reset() is exercised too


def rss_mib() -> float:
    """Current resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class RSSReadings(Callback):
    """Resident memory after the warm-up and at the end."""

    def __init__(self, at: tuple[int, ...]):
        self.at, self.readings = at, {}

    def on_step(self, run: TeachingRun) -> None:
        if run.step in self.at:
            gc.collect()
            self.readings[run.step] = rss_mib()


def soak(steps: int, teacher_name: str) -> dict:
    env = env_factory(horizon=EPISODE, eval_every=200, tensor_obs=True, disable_env_checker=True)()
    teacher = make_agent(teacher_name)
    warm = int(steps * WARMUP_FRACTION)
    rss = RSSReadings((warm, steps))
    teach(start(env, teacher.train(teacher.kind == "online"), seed=0), steps, [rss], episode_seed=lambda episode: episode)
    start_mib, end = rss.readings[warm], rss.readings[steps]
    return {"what": teacher_name, "steps": steps, "rss_after_warmup_mib": start_mib, "rss_end_mib": end,
            "growth_percent": 100 * (end - start_mib) / start_mib}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--meta-steps", type=int, default=5_000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    results = [soak(args.env_steps, "uniform"), soak(args.meta_steps, "meta_grad")]
    for r in results:
        verdict = "ok" if r["growth_percent"] < 5 else "GROWS"
        print(
            f"{r['what']:22s} {r['steps']:6d} steps: RSS {r['rss_after_warmup_mib']:.1f} -> {r['rss_end_mib']:.1f} MiB ({r['growth_percent']:+.2f}%) {verdict}"
        )
    if not args.no_save:
        print("saved", save("soak", {"machine": machine(torch.device("cpu")), "results": results}))


if __name__ == "__main__":
    main()
