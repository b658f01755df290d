"""What ``peftkit ui`` reads: run folders and search studies under one root, and nothing outside it.

Every path a request names goes through ``Store.resolve``: relative, no ``..`` part, and still inside the root once
symlinks are resolved; anything else is ``Refused`` (the app answers 404). Files are read as they are on disk
(config.yaml, report.json, live.json, summary.json): no model is built here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..search.report import PLOTS_DIR as SEARCH_PLOTS, SUMMARY
from ..train.folder import CHECKPOINTS_DIR, CONFIG_FILE, PLOTS_DIR, REPORT_FILE
from ..train.tracking import LIVE_FILE, read_live

MAX_DEPTH = 5  # folders below the root searched for runs (a search's trials sit at <study>/trials/NNN)
STALE_SECONDS = 120  # a run without a report, a live process or a write this recent has failed (or was killed)
SKIP = {"checkpoints", "best", "adapter", "model", "tensorboard", "plots", "mlartifacts", ".git", "__pycache__"}
STUDY_DB = "study.db"


class Refused(Exception):
    """A path outside the root, or one that names no run/study/file there."""


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--runs {root}: no such folder; give the folder your runs are written to")

    # -- paths ----------------------------------------------------------------------------------------
    def resolve(self, relative: str) -> Path:
        """``relative`` (as a request gives it) to a path inside the root, or ``Refused``."""
        if not isinstance(relative, str) or "\x00" in relative or "\\" in relative:
            raise Refused("bad path")
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            raise Refused("path outside --runs")
        path = (self.root / pure).resolve()
        if path != self.root and self.root not in path.parents:  # a symlink pointing out
            raise Refused("path outside --runs")
        return path

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    def file(self, relative: str) -> Path:
        path = self.resolve(relative)
        if not path.is_file():
            raise Refused("no such file")
        return path

    # -- discovery ------------------------------------------------------------------------------------
    def folders(self) -> tuple[list[Path], list[Path]]:
        """(run folders, study folders) under the root, by path."""
        runs, studies = [], []
        for current, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(current)
            depth = len(here.relative_to(self.root).parts)
            if SUMMARY in files or STUDY_DB in files:
                studies.append(here)
            elif CONFIG_FILE in files:
                runs.append(here)
            dirs[:] = sorted(d for d in dirs if d not in SKIP and depth < MAX_DEPTH and not (here / d).is_symlink())
        return sorted(runs), sorted(studies)

    def runs(self) -> list[dict]:
        return [self.run_summary(path) for path in self.folders()[0]]

    def studies(self) -> list[dict]:
        out = []
        for path in self.folders()[1]:
            summary = _json(path / SUMMARY)
            best = (summary.get("best") or [{}])[0]
            out.append({"path": self.relative(path), "study": summary.get("study", path.name),
                        "objectives": summary.get("objectives", []), "trials": len(summary.get("trials", [])),
                        "best_number": best.get("number"), "best_values": best.get("values")})
        return out

    # -- one run --------------------------------------------------------------------------------------
    def run_path(self, relative: str) -> Path:
        path = self.resolve(relative)
        if not (path / CONFIG_FILE).is_file():
            raise Refused("not a run folder")
        return path

    def run_summary(self, path: Path) -> dict[str, Any]:
        config = _yaml(path / CONFIG_FILE)
        report = _json(path / REPORT_FILE)
        live = read_live(path)
        metric = report.get("metric_for_best_model") or config.get("metric_for_best_model")
        split = report.get("dev") or report.get("test") or {}
        value = split.get(metric) if isinstance(split, dict) else None
        return {"path": self.relative(path), "name": path.name, "task": config.get("task", "classification"),
                "method": config.get("method"), "model": _short_model(config.get("model")),
                "metric": metric, "value": value if isinstance(value, (int, float)) else None,
                "trainable_share": report.get("trainable_share"), "seconds": _seconds(path, report, live),
                "date": _date(path), "state": _state(path, report, live),
                "step": live.get("step", report.get("steps")), "total_steps": live.get("total_steps", report.get("steps"))}

    def run_detail(self, relative: str) -> dict[str, Any]:
        path = self.run_path(relative)
        report = _json(path / REPORT_FILE)
        live = read_live(path)
        history = report.get("history") or live.get("history") or []
        plots = sorted(p.name for p in (path / PLOTS_DIR).glob("*.png")) if (path / PLOTS_DIR).is_dir() else []
        checkpoints = sorted(p.name for p in (path / CHECKPOINTS_DIR).iterdir() if p.is_dir()) \
            if (path / CHECKPOINTS_DIR).is_dir() else []
        return {**self.run_summary(path), "config": _yaml(path / CONFIG_FILE), "report": report, "history": history,
                "plots": [f"{self.relative(path)}/{PLOTS_DIR}/{name}" for name in plots], "checkpoints": checkpoints}

    # -- one study ------------------------------------------------------------------------------------
    def study_detail(self, relative: str) -> dict[str, Any]:
        path = self.resolve(relative)
        summary = _json(path / SUMMARY)
        if not summary and not (path / STUDY_DB).is_file():
            raise Refused("not a search folder")
        plots = sorted(p.name for p in (path / SEARCH_PLOTS).glob("*.png")) if (path / SEARCH_PLOTS).is_dir() else []
        trials = summary.get("trials", [])
        for row in trials:  # a trial's run folder, when it lies under the root (a link in the table)
            try:
                row["run"] = self.relative(self.run_path(self.relative(Path(row["folder"]).resolve())))
            except (Refused, ValueError, TypeError, KeyError):
                row["run"] = None
        return {"path": self.relative(path), "summary": summary, "trials": trials,
                "plots": [f"{self.relative(path)}/{SEARCH_PLOTS}/{name}" for name in plots]}


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _short_model(model: Any) -> str | None:
    return None if model is None else Path(str(model)).name or str(model)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _date(path: Path) -> str | None:
    stamp = _mtime(path / CONFIG_FILE)
    return None if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _seconds(path: Path, report: dict, live: dict) -> float | None:
    if "seconds" in live:
        return live["seconds"]
    start, end = _mtime(path / CONFIG_FILE), _mtime(path / REPORT_FILE)  # a run from before live.json
    return end - start if start is not None and end is not None else None


def _state(path: Path, report: dict, live: dict) -> str:
    if report:
        return "finished"
    if live.get("state") == "failed":
        return "failed"
    newest = max(filter(None, [_mtime(path / LIVE_FILE), _mtime(path / CONFIG_FILE), _mtime(path / CHECKPOINTS_DIR)]),
                 default=0.0)
    return "running" if _alive(live) or time.time() - newest < STALE_SECONDS else "failed"


def _alive(live: dict) -> bool:
    import socket

    pid = live.get("pid")
    if not isinstance(pid, int) or live.get("host") != socket.gethostname() or live.get("state") != "running":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
