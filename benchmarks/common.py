"""Shared helpers of the benchmarks: the packaged model, interleaved timing, peak memory, RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def minilm_path() -> Path:
    from peftkit.tasks.demo import minilm_path as path

    return path()


def interleaved(workloads: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each workload once per round, rounds after rounds (A B C A B C ...), so that the machine's noise
    hits every workload alike. Returns the seconds of every timed call."""
    for _ in range(warmup):
        for run in workloads.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, run in workloads.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def live_heap_bytes() -> int | None:
    """Bytes currently allocated through glibc malloc (in use, not merely kept by the allocator); None if not glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakSampler:
    """Samples the live heap every millisecond in a thread and keeps the maximum."""

    def __init__(self) -> None:
        import threading

        self.start_bytes = live_heap_bytes()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, (live_heap_bytes() or 0) - (self.start_bytes or 0))
            self._stop.wait(0.001)

    def __enter__(self) -> "PeakSampler":
        if self.start_bytes is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_isolated(script: Path, args: list[str], timeout: float = 900) -> str:
    """Run a benchmark child in a fresh process (peak memory can only be measured one workload per process)."""
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- results
def machine() -> str:
    import torch

    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"{cpu}, {threads} threads"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def append_results(title: str, table: str, notes: str = "") -> None:
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = f"\n## {title} ({stamp})\n\nCommand: `{command}`  \nMachine: {machine()}\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    with open(RESULTS, "a", encoding="utf-8") as handle:
        if handle.tell() == 0:
            handle.write("# Benchmark results\n\nEvery table below was produced by the command printed above it.\n")
        handle.write(block)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def file_digest(path: Path) -> str:
    """sha256 of a data file, so that a recorded run names the exact data it trained on."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def timed_once(folder: Path, train: Callable[[bool], None], settings: object) -> float:
    """Seconds a benchmark's training run took, measured once: ``train(resume)`` runs unless ``folder`` already holds
    the time of a finished run (then it is reused); a run interrupted before resumes from its checkpoint (the time
    is then that of its last part only). ``settings`` (JSON-able: the run's overrides) are recorded with the run; a
    folder holding a run of other settings is refused rather than reused."""
    from peftkit.atomic import write_json
    from peftkit.train.folder import RunFolder

    folder = Path(folder)
    recorded, timing = folder / "benchmark_settings.json", folder / "benchmark_train_seconds.json"
    wanted = json.loads(json.dumps(settings))
    if recorded.exists() and json.loads(recorded.read_text()) != wanted:
        raise SystemExit(f"{folder} holds a run made with other settings ({recorded}); pass another output folder "
                         "or delete that one")
    if (timing.exists() or (folder / "config.yaml").exists()) and not recorded.exists():
        raise SystemExit(f"{folder} holds a run whose settings were not recorded; pass another output folder or "
                         "delete that one")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(recorded, wanted)
    if not timing.exists():
        started = time.perf_counter()
        train(RunFolder(folder).holds_finished_or_resumable_run())
        write_json(timing, {"seconds": round(time.perf_counter() - started, 1)})
    return json.loads(timing.read_text())["seconds"]


# ------------------------------------------------ logs shared by several benchmark processes
def record(log: str | None, result: dict) -> None:
    """Append one result to a JSON-lines log (several processes may share it)."""
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")


def _claim_file(log: str, method: str, seed: int | str) -> Path:
    return Path(f"{log}.claims") / f"{method}-{seed}"


def claim(log: str | None, method: str, seed: int | str) -> bool:
    """Take (method, seed) for this process, so that several processes sharing one log split the runs. A claim
    whose process is gone is taken over."""
    if not log:
        return True
    path = _claim_file(log, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False  # another live process runs it
        except (ProcessLookupError, ValueError):
            path.write_text(str(os.getpid()))
            return True
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def release(log: str | None, method: str, seed: int | str) -> None:
    if log:
        _claim_file(log, method, seed).unlink(missing_ok=True)
