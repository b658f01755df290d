"""The try-it box: a text through each chosen run, in this process (the run folder, as ``peftkit predict --text``
does) or through a running ``peftkit serve`` (``--server URL``: its adapters, its task routes)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

from ..tasks import get_task

CACHED_RUNS = 4  # run folders kept loaded (a model each)
TIMEOUT = 60.0


class InProcess:
    def __init__(self) -> None:
        self._runs: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()  # one prediction at a time: models are shared and torch uses every core

    def _run(self, path: Path):
        from ..train.run import Run

        if path not in self._runs:
            self._runs[path] = Run(path)
            while len(self._runs) > CACHED_RUNS:
                self._runs.popitem(last=False)
        self._runs.move_to_end(path)
        return self._runs[path]

    def predict(self, path: Path, text: str) -> dict:
        """``{"label": ..., "row": the row peftkit predict (or generate) prints}``."""
        with self._lock:
            run = self._run(path)
            row = ANSWERS.get(run.task.name, _predicted)(run, text)
        return {"label": answer_of(row), "row": row}


def _predicted(run, text: str) -> dict:
    return run.predict(run.task.inputs([text], None))[0]


def _generated(run, text: str) -> dict:
    """A greedy answer, as ``peftkit generate --run RUN --prompt TEXT --max_new_tokens 64`` gives it."""
    from ..tasks.causal_lm_generate import Sampling
    from ..train.generate import generate_rows, prompt_messages

    return generate_rows(run, [prompt_messages(run, text)], Sampling(max_new_tokens=GENERATED_TOKENS))[0]


#: how the try-it box answers for a task (default: the rows of ``peftkit predict``)
ANSWERS = {"causal-lm": _generated}
GENERATED_TOKENS = 64


def answer_of(row: dict) -> str:
    """The short answer of a prediction row: a label, the entities, or a generated text."""
    if "label" in row:
        return str(row["label"])
    if "entities" in row:
        return ", ".join(f'{e.get("text")} ({e.get("type")})' for e in row["entities"]) or "(no entities)"
    for key in ("completion", "answer", "text"):
        if key in row:
            return str(row[key])
    return json.dumps(row, ensure_ascii=False)[:200]


class Remote:
    """A running ``peftkit serve``: ``GET /v1/adapters``, then each adapter's task route with ``texts``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                return json.loads(answer.read().decode())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{self.url}{path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise RuntimeError(f"{self.url}{path}: {err}; is `peftkit serve` running there?") from None

    def adapters(self) -> list[dict]:
        return self._call("/v1/adapters").get("adapters", [])

    def predict(self, adapter: dict, text: str) -> dict:
        route = get_task(adapter.get("task") or "classification").serve_schema().route
        answer = self._call(route, {"adapter": adapter["name"], "texts": [text]})
        rows = answer.get("predictions") or answer.get("results") or answer.get("entities") or [answer]
        row = rows[0] if isinstance(rows, list) and rows else answer
        return {"label": answer_of(row) if isinstance(row, dict) else str(row), "row": row}
