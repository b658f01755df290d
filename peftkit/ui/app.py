"""``peftkit ui``: the FastAPI app (HTML pages and their JSON) over one folder of runs and searches.

Safe by default: it binds 127.0.0.1 (``command.py``), and every path a request names is resolved by ``Store``, which
refuses anything outside ``--runs`` (``..``, absolute, encoded, or a symlink pointing out) with 404.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from . import pages
from .store import Refused, Store
from .tryit import InProcess, Remote

STATIC = Path(__file__).parent / "static"
SERVED_FILES = {".png": "image/png", ".svg": "image/svg+xml"}  # what /file hands out (plots), nothing else
MAX_TEXT = 5000


LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(runs_root: str | Path, server: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """``allowed_hosts``: the Host headers answered (bound to 127.0.0.1: ``LOCAL_HOSTS``, so that a web page a browser
    opens elsewhere cannot read the runs through DNS rebinding); None: any."""
    store = Store(runs_root)
    local, remote = InProcess(), (Remote(server) if server else None)
    app = FastAPI(title="peftkit ui", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(Refused)
    async def refused(request, err: Refused):
        return JSONResponse({"error": f"not found: {err}"}, status_code=404)

    # -- pages ----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index():
        return pages.runs_page(store.runs(), store.studies())

    @app.get("/run", response_class=HTMLResponse)
    def run(p: str):
        return pages.run_page(store.run_detail(p))

    @app.get("/compare", response_class=HTMLResponse)
    def compare(runs: list[str] = Query(default=[])):
        if len(runs) < 2:
            return HTMLResponse(pages.page("compare", "<p>select two or more runs on the runs page</p>"), status_code=400)
        return pages.compare_page([store.run_detail(p) for p in runs])

    @app.get("/searches", response_class=HTMLResponse)
    def searches():
        return pages.searches_page(store.studies())

    @app.get("/search", response_class=HTMLResponse)
    def search(p: str):
        return pages.search_page(store.study_detail(p))

    @app.get("/try", response_class=HTMLResponse)
    def try_it(text: str = "", runs: list[str] = Query(default=[])):
        text = text[:MAX_TEXT]
        if remote is not None:
            return _try_remote(text, runs)
        listed = store.runs()
        answers = [_answer(p, text) for p in runs] if text.strip() else []
        return pages.try_page(listed, runs, text, answers, None)

    def _answer(path: str, text: str) -> dict:
        try:
            return {"run": path, **local.predict(store.run_path(path), text)}
        except Refused:
            raise
        except Exception as err:  # a run that cannot predict (unfinished, a base model missing here): said in its row
            return {"run": path, "label": "error", "error": f"{type(err).__name__}: {err}"}

    def _try_remote(text: str, chosen: list[str]):
        try:
            adapters = remote.adapters()
        except RuntimeError as err:
            return HTMLResponse(pages.page("try it", f"<p class='error'>{pages.escape(str(err))}</p>"), status_code=502)
        rows = [{"path": a["name"], "task": a.get("task"), "state": "finished"} for a in adapters]
        answers = []
        for adapter in (a for a in adapters if a["name"] in chosen and text.strip()):
            try:
                answers.append({"run": adapter["name"], **remote.predict(adapter, text)})
            except RuntimeError as err:
                answers.append({"run": adapter["name"], "label": "error", "error": str(err)})
        return pages.try_page(rows, chosen, text, answers, remote.url)

    # -- files and JSON -------------------------------------------------------------------------------
    @app.get("/file")
    def file(p: str):
        path = store.file(p)
        if path.suffix.lower() not in SERVED_FILES:
            raise Refused("only plots are served")
        return FileResponse(path, media_type=SERVED_FILES[path.suffix.lower()])

    @app.get("/api/runs")
    def api_runs():
        return {"runs": store.runs(), "searches": store.studies()}

    @app.get("/api/runs/rows", response_class=HTMLResponse)
    def api_rows():
        return "".join(pages.run_row(r) for r in store.runs())

    @app.get("/api/run")
    def api_run(p: str):
        return store.run_detail(p)

    @app.get("/api/search")
    def api_search(p: str):
        return store.study_detail(p)

    return app
