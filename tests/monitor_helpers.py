"""A stub classifier and simulated streams for the monitor tests; run as a script it is ``peftkit monitor`` with
the stub in place of a run (``python monitor_helpers.py --sleep S <monitor options>``), for SIGKILL tests.

A stub text reads ``"<label> <score> ..."``: it is classified as <label> with probability <score>."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

LABELS = ["negative", "neutral", "positive"]
T0 = 1_700_000_400  # a multiple of 600: ten-minute windows start here


def stub_classify(texts):
    rows = []
    for text in texts:
        label, score = text.split()[:2]
        rest = (1 - float(score)) / (len(LABELS) - 1)
        rows.append({"label": label, "probability": float(score),
                     "probabilities": {name: float(score) if name == label else rest for name in LABELS}})
    return rows


def stream(shares: list[float], per_window: int = 100, seconds: int = 6, group: str | None = None) -> list[dict]:
    """Records in blocks of ``per_window``; block k has exactly ``shares[k] * per_window`` negatives (spread
    evenly), the rest neutral. Record i (1-based) is at time T0 + (i - 1) * seconds."""
    out = []
    for k, share in enumerate(shares):
        negatives = round(share * per_window)
        for j in range(per_window):
            i = k * per_window + j + 1
            negative = (j * negatives) // per_window != ((j + 1) * negatives) // per_window
            score = 0.6 + 0.39 * ((i * 37) % 100) / 100
            text = f"{'negative' if negative else 'neutral'} {score:.4f} record {i}"
            out.append({"text": text, "time": T0 + (i - 1) * seconds, "source": "sim",
                        **({"ticker": group} if group else {})})
    return out


def write_lines(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def read_alerts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> int:
    import argparse
    import time

    from peftkit.monitor.command import add_arguments, run

    sleep = float(argv[argv.index("--sleep") + 1]) if "--sleep" in argv else 0.0
    if "--sleep" in argv:
        del argv[argv.index("--sleep"): argv.index("--sleep") + 2]
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def slow(texts):
        time.sleep(sleep)  # a slow model: gives the test time to kill the process mid-stream
        return stub_classify(texts)

    return run(parser.parse_args(["--run", "stub", *argv]), classifier=(slow, LABELS))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
