"""Running a sweep of independent jobs crash-safely, in local worker processes or as Ray tasks.

Each finished job's result is appended to ``runs.jsonl`` (one line, flushed to disk) as soon as it
ends, so a sweep killed at any moment loses only the jobs in flight; ``--resume`` runs the missing
ones. A job that raises is recorded in ``errors.jsonl`` with its error and the others go on (it is
not in ``runs.jsonl``, so ``--resume`` tries it again). With the Ray backend each job is a Ray core
task with declared resources; loaded teacher checkpoints travel through Ray's object store, so the
workers need no shared disk for them (datasets: ``mnist1d`` and ``digits`` are generated on each
node; torchvision datasets must sit under the same ``--data-root`` on every node).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

BACKENDS = ("processes", "ray")


class BackendError(ValueError):
    """The chosen backend cannot run here (not installed, unreachable, missing resources)."""


def read_finished(path: Path, canonical: Callable[[str], str] = str) -> dict[str, dict[str, Any]]:
    """The finished runs recorded in runs.jsonl by ``canonical`` of their key (a line cut by a crash, or
    any other line that is not a run record, is ignored: its job runs again); ``canonical`` maps a key
    of an older format to today's."""
    finished = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(result, dict) and isinstance(result.get("key"), str):  # not a run record: skipped, as a cut line
                finished[canonical(result["key"])] = result
    return finished


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line, flushed to disk before the next job's result (after a line
    that a crash cut short, on a line of its own)."""
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if cut else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def guarded(run: Callable[..., dict[str, Any]], job: Any, *args: Any) -> dict[str, Any]:
    """``run(job, *args)``, or a record of its error: one failing job never stops a sweep."""
    try:
        return run(job, *args)
    except Exception as e:  # any error of one student's run is reported, not fatal
        return {"key": job.key, "error": f"{type(e).__name__}: {e}", "job": job.label, "trace": traceback.format_exc()[-2000:]}


class Sweep:
    """Where and how the jobs of one benchmark run."""

    def __init__(self, backend: str = "processes", workers: int = 1, ray_address: str | None = None, job_cpus: float = 1.0,
                 job_gpus: float = 0.0):  # fmt: skip
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        self.backend, self.workers, self.job_cpus, self.job_gpus = backend, workers, job_cpus, job_gpus
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS")
        self._ray: Any = None

    # ------------------------------------------------------------------ checks before anything runs
    def connect(self) -> None:
        """Import and join (or start) Ray, and check the resources a job asks for; ``BackendError``
        with one clear message otherwise. Nothing to do for local processes."""
        if self.backend != "ray":
            if self.job_gpus:
                raise BackendError(
                    "--job-gpus applies to --backend ray; local worker processes share the devices of this machine"
                )
            return
        try:
            import ray
        except ImportError:
            raise BackendError("--backend ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
        self._ray = ray
        address = self.ray_address
        if address and address != "auto":
            check_reachable(address)  # also when this process already runs a Ray: an explicit address must work
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:  # a local Ray, started on demand with this machine's resources
                    import torch

                    ray.init(
                        num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False
                    )
            except ConnectionError as e:
                raise BackendError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        resources = ray.cluster_resources()
        for name, asked in (("CPU", self.job_cpus), ("GPU", self.job_gpus)):
            if asked and resources.get(name, 0) < asked:
                raise BackendError(
                    f"a job asks for {asked:g} {name} (--job-{name.lower()}s) but the Ray cluster has {resources.get(name, 0):g}"
                )

    # ------------------------------------------------------------------ running
    def run(
        self,
        jobs: list[Any],
        run: Callable[..., dict[str, Any]],
        out: Path,
        description: str,
        progress: bool,
        canonical: Callable[[str], str] = str,
    ) -> dict[str, dict]:
        """Run every job not yet in ``out/runs.jsonl`` (keys compared after ``canonical``, which jobs'
        keys already are); returns key -> result of every finished job (failures are appended to
        ``out/errors.jsonl`` and left out)."""
        log, errors = out / "runs.jsonl", out / "errors.jsonl"
        finished = read_finished(log, canonical)
        todo = [job for job in jobs if job.key not in finished]
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), disable=not progress, desc=description, unit="run")
        try:
            for result in self._results(todo, run):
                if "error" in result:
                    append_line(errors, result)
                    tqdm.write(f"job failed: {result['job']}: {result['error']}")
                else:
                    append_line(log, result)
                    finished[result["key"]] = result
                bar.update(1)
        finally:
            bar.close()
        return finished

    def _results(self, todo: list[Any], run: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.backend == "ray":
            yield from self._ray_results(todo, run)
        elif self.workers == 1 or len(todo) <= 1:
            yield from (guarded(run, job) for job in todo)
        else:  # a worker that dies (killed, out of memory) fails its job instead of hanging the sweep
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"))
            try:
                futures = {pool.submit(guarded, run, job): job for job in todo}
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        yield future.result()
                    except BrokenProcessPool as e:
                        yield {"key": job.key, "error": f"worker process died: {e}", "job": job.label, "trace": ""}
            finally:  # on Ctrl-C, queued jobs are dropped at once
                pool.shutdown(wait=False, cancel_futures=True)

    def _ray_results(self, todo: list[Any], run: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
        ray = self._ray
        blobs = {path: ray.put(checkpoint_file(path).read_bytes()) for path in {job.teacher_path for job in todo} - {None}}
        task = ray.remote(num_cpus=self.job_cpus, num_gpus=self.job_gpus, max_retries=0)(run_with_checkpoint)
        pending = {task.remote(run, job, blobs.get(job.teacher_path)): job for job in todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as e:  # the task's worker died (killed, out of memory, ...)
                    yield {"key": job.key, "error": f"{type(e).__name__}: {e}", "job": job.label, "trace": ""}
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def run_with_checkpoint(run: Callable[..., dict[str, Any]], job: Any, checkpoint: bytes | None) -> dict[str, Any]:
    """On a Ray worker: write a loaded teacher's checkpoint (from the object store) to a private
    temporary file and run the job with it."""
    if checkpoint is None:
        return guarded(run, job)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "teacher.pt"
        local.write_bytes(checkpoint)
        return guarded(run, job, str(local))


def checkpoint_file(path: str) -> Path:
    """The checkpoint file of a ``runs/<name>/`` folder or a ``teacher.pt`` path."""
    return Path(path) / "teacher.pt" if Path(path).is_dir() else Path(path)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with one message, when nothing listens at a ``host:port`` Ray address."""
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").partition(":")
    try:
        with socket.create_connection((host, int(port or (10001 if client else 6379))), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot reach the Ray cluster at {address!r} ({e}); start it with `ray start --head`") from None
