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
CAUSAL_LM = "causal-lm"


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
ANSWERS = {CAUSAL_LM: _generated}
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
    """A running ``peftkit serve``: ``GET /v1/adapters``, then each adapter's task route with ``texts``; a causal-lm
    server (``--task causal-lm``, the one that answers ``GET /v1/models``) through its OpenAI endpoint
    ``/v1/chat/completions`` with ``model`` = the adapter's name, greedy, as the in-process box generates."""

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

    def generates(self) -> bool:
        """Whether the server is the OpenAI-compatible one of causal LMs (only it lists ``/v1/models``)."""
        try:
            return isinstance(self._call("/v1/models").get("data"), list)
        except RuntimeError:
            return False

    def adapters(self) -> list[dict]:
        adapters = self._call("/v1/adapters").get("adapters", [])
        if self.generates():  # its adapters carry no task: they are all causal-lm
            adapters = [{**a, "task": a.get("task") or CAUSAL_LM} for a in adapters]
        return adapters

    def predict(self, adapter: dict, text: str) -> dict:
        task = adapter.get("task") or "classification"
        if task == CAUSAL_LM:
            row = self._chat(adapter["name"], text)
        else:
            route = get_task(task).serve_schema().route
            answer = self._call(route, {"adapter": adapter["name"], "texts": [text]})
            rows = answer.get("predictions") or answer.get("results") or answer.get("entities") or [answer]
            row = rows[0] if isinstance(rows, list) and rows else answer
        return {"label": answer_of(row) if isinstance(row, dict) else str(row), "row": row}

    def _chat(self, model: str, text: str) -> dict:
        """One user turn through ``/v1/chat/completions`` (temperature 0: greedy), as a ``peftkit generate`` row."""
        body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                "max_tokens": GENERATED_TOKENS}
        choice = self._call("/v1/chat/completions", body)["choices"][0]
        return {"prompt": text, "completion": choice["message"]["content"], "finish_reason": choice.get("finish_reason")}

