"""Run every benchmark on one device and save their JSON to benchmarks/results/.

python benchmarks/run_all.py [--device cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for script in ("env_overhead.py", "teach_step.py"):
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), "--device", args.device], check=True)
    if args.device == "cpu":  # the CNN pools channels-last on the CPU only
        print("== cnn_layout.py", flush=True)
        subprocess.run([sys.executable, str(HERE / "cnn_layout.py")], check=True)


if __name__ == "__main__":
    main()
