"""Wall time of one benchmark sweep with local worker processes and with a local Ray, side by side,
and Ray's overhead per job (from a sweep of near-empty jobs, where the work itself is negligible).

    python benchmarks/sweep_backends.py                          # suites/quick.yaml, 2 workers / 2 Ray CPUs
    python benchmarks/sweep_backends.py --suite suites/quick.yaml --seeds 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from benchmarks.common import machine, save  # noqa: E402


def timed_sweep(argv: list[str]) -> float:
    """Seconds of one ``evaluate.py`` run (into a fresh temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        evaluate.main([*argv, "--out", str(Path(folder) / "out"), "--no-progress"])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="suites/quick.yaml")
    parser.add_argument("--seeds", type=int, default=None, help="override the suite's seeds (a shorter run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    suite = ["--suite", args.suite] + (["--seeds", str(args.seeds)] if args.seeds else [])
    tiny = [
        "--agents",
        "uniform",
        "--dataset",
        "digits",
        "--steps",
        "1",
        "--eval-every",
        "1",
        "--seeds",
        "40",
        "--val-size",
        "200",
    ]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet  # the reports themselves are not of interest here
        try:
            results = {
                "suite, processes": timed_sweep([*suite, "--workers", str(args.workers)]),
                "suite, ray": timed_sweep([*suite, "--backend", "ray"]),
                "40 empty jobs, processes": timed_sweep([*tiny, "--workers", str(args.workers)]),
                "40 empty jobs, ray": timed_sweep([*tiny, "--backend", "ray"]),
            }
        finally:
            sys.stdout = stdout
    overhead = (results["40 empty jobs, ray"] - results["40 empty jobs, processes"]) / 40 * args.workers
    for name, seconds in results.items():
        print(f"{name:28s} {seconds:8.1f} s")
    print(f"ray / processes on the suite: x{results['suite, ray'] / results['suite, processes']:.2f}")
    print(f"Ray's extra cost per job (per worker slot): {overhead:+.3f} s")
    payload = {"machine": machine(torch.device("cpu")), "suite": args.suite, "seeds": args.seeds, "workers": args.workers,
               "seconds": results, "ray_overhead_per_job_s": overhead}  # fmt: skip
    if not args.no_save:
        print("saved", save("sweep_backends", payload))


if __name__ == "__main__":
    main()
