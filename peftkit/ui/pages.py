"""The HTML of each page (server-rendered; ``static/ui.js`` only sorts, filters and refreshes the runs table)."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Sequence
from urllib.parse import urlencode

import yaml

from ..train.tracking import flatten_keys
from .charts import heatmap, line_chart

NAV = [("/", "runs"), ("/searches", "searches"), ("/try", "try it")]
SPLITS = ("dev", "test")


def page(title: str, body: str, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    nav = " ".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)} · peftkit</title>'
            '<link rel="stylesheet" href="/static/ui.css"></head><body>'
            f'<header><b>peftkit</b> {nav}</header><main><h1>{escape(title)}</h1>{body}</main>'
            '<script src="/static/ui.js"></script></body></html>')


def run_link(path: str, text: str | None = None) -> str:
    return f'<a href="/run?{urlencode({"p": path})}">{escape(text or path)}</a>'


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m {rest:02d}s" if minutes else f"{seconds:.1f}s"


# ----------------------------------------------------------------------------------------------------- runs
RUN_COLUMNS = [("path", "run"), ("task", "task"), ("method", "method"), ("model", "base model"), ("value", "metric"),
               ("trainable_share", "trainable"), ("seconds", "train time"), ("date", "date"), ("state", "state")]


def runs_page(runs: list[dict], studies: list[dict]) -> str:
    head = "".join(f'<th data-key="{key}" class="sortable">{escape(name)}</th>' for key, name in RUN_COLUMNS)
    body = (f'<p><input id="filter" type="search" placeholder="filter (any column)"> '
            f'<span id="count">{len(runs)} runs</span></p>'
            '<form action="/compare" method="get" id="runs-form"><table id="runs"><thead><tr><th></th>'
            f'{head}</tr></thead><tbody>{"".join(run_row(r) for r in runs)}</tbody></table>'
            '<p><button type="submit">compare selected</button> '
            '<button type="submit" formaction="/try">try selected</button></p></form>')
    if studies:
        rows = "".join(f'<tr><td><a href="/search?{urlencode({"p": s["path"]})}">{escape(s["path"])}</a></td>'
                       f'<td>{escape(", ".join(s["objectives"]))}</td><td>{s["trials"]}</td>'
                       f'<td>{fmt(s["best_number"])}</td><td>{fmt((s["best_values"] or [None])[0])}</td></tr>'
                       for s in studies)
        body += ('<h2>searches</h2><table id="studies"><tr><th>study</th><th>objectives</th><th>trials</th>'
                 f'<th>best trial</th><th>best value</th></tr>{rows}</table>')
    return page("runs", body)


def run_row(run: dict) -> str:
    """One row of the runs table (also what /api/runs/rows returns for the live refresh)."""
    share = run["trainable_share"]
    progress = f' ({run["step"]}/{run["total_steps"]})' if run["state"] == "running" and run.get("total_steps") else ""
    cells = {"path": run_link(run["path"]), "task": fmt(run["task"]), "method": fmt(run["method"]),
             "model": fmt(run["model"]),
             "value": f'{escape(run["metric"] or "")} {fmt(run["value"])}' if run["metric"] else fmt(run["value"]),
             "trainable_share": "–" if share is None else f"{100 * share:.3f}%",
             "seconds": duration(run["seconds"]), "date": fmt(run["date"]),
             "state": f'<span class="state {run["state"]}">{run["state"]}{progress}</span>'}
    sort_values = {**run, "value": run["value"] if run["value"] is not None else "",
                   "trainable_share": share if share is not None else "", "seconds": run["seconds"] or ""}
    tds = "".join(f'<td data-sort="{escape(str(sort_values.get(key) or ""))}">{cells[key]}</td>' for key, _ in RUN_COLUMNS)
    return (f'<tr data-run="{escape(run["path"])}" data-state="{run["state"]}"><td><input type="checkbox" name="runs" '
            f'value="{escape(run["path"])}"></td>{tds}</tr>')


# ----------------------------------------------------------------------------------------------------- a run
def curves(history: list[dict]) -> tuple[list, list]:
    """(loss series, metric series) of one run's history: every record is a point of the loss chart."""
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    dev = [(h["step"], h["dev_loss"]) for h in history if "dev_loss" in h]
    names = sorted({k for h in history for k in h if k.startswith("dev_") and k != "dev_loss"})
    metrics = [(name[4:], [(h["step"], h[name]) for h in history if name in h]) for name in names]
    return [("train loss", train), ("dev loss", dev)], metrics


def run_page(run: dict) -> str:
    report, config = run["report"], run["config"]
    loss, metrics = curves(run["history"])
    parts = [summary_table(run),
             '<div class="charts">', line_chart(loss, "loss", "loss-chart", y_label="loss"),
             line_chart(metrics, f"dev {metrics[0][0]}" if len(metrics) == 1 else "dev metrics", "metric-chart")
             if metrics else "", "</div>"]
    for split in SPLITS:
        if isinstance(report.get(split), dict):
            parts.append(split_section(split, report[split], report))
    parts.append(causal_section(report))
    if run["plots"]:
        parts.append("<h2>plots</h2>" + "".join(f'<img alt="{escape(p)}" src="/file?{urlencode({"p": p})}">'
                                                  for p in run["plots"]))
    parts.append(f'<h2>checkpoints</h2><p>{escape(", ".join(run["checkpoints"]) or "none kept")}</p>')
    parts.append(f'<h2>resolved config</h2><pre id="config">{escape(yaml.safe_dump(config, sort_keys=False))}</pre>')
    return page(f"run {run['path']}", "".join(parts), refresh=5 if run["state"] == "running" else None)


def summary_table(run: dict) -> str:
    report = run["report"]
    trainable = (f'{report["trainable_parameters"]:,} of {report["total_parameters"]:,} '
                 f'({100 * report["trainable_share"]:.3f}%)') if "trainable_parameters" in report else "–"
    rows = [("task", run["task"]), ("method", run["method"]), ("base model", run["model"]),
            ("state", run["state"]), ("step", f'{run["step"]} of {run["total_steps"]}'),
            (run["metric"] or "metric", fmt(run["value"])), ("trainable parameters", trainable),
            ("train time", duration(run["seconds"])), ("best step", fmt(report.get("best_step")))]
    return '<table id="summary">' + "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                                           for k, v in rows) + "</table>"


def split_section(split: str, result: dict, report: dict) -> str:
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    out = [f'<h2>{split}</h2><p class="scalars">' + " · ".join(f"{escape(k)} <b>{fmt(v)}</b>" for k, v in scalars.items())
           + "</p>"]
    per = result.get("per_class") or result.get("per_type")
    if isinstance(per, dict) and per:
        kind = "class" if "per_class" in result else "entity type"
        rows = "".join(f'<tr><td>{escape(name)}</td><td>{fmt(m.get("precision"))}</td><td>{fmt(m.get("recall"))}</td>'
                       f'<td>{fmt(m.get("f1-score"))}</td><td>{fmt(m.get("support"))}</td></tr>' for name, m in per.items())
        out.append(f'<table id="per-class-{split}" class="per-class"><tr><th>{kind}</th><th>precision</th><th>recall</th>'
                   f'<th>F1</th><th>support</th></tr>{rows}</table>')
    if result.get("confusion_matrix"):
        labels = result.get("entity_types") or report.get("labels") or []
        out.append(f"<h3>confusion matrix ({split})</h3>" + heatmap(result["confusion_matrix"], labels, f"confusion-{split}"))
    return "".join(out)


def causal_section(report: dict) -> str:
    out = []
    if isinstance(report.get("base_dev"), dict) and isinstance(report.get("dev"), dict):
        base, dev = report["base_dev"], report["dev"]
        out.append('<h2>base vs adapted (dev)</h2><table id="base-vs-adapted"><tr><th></th><th>base</th><th>adapted</th></tr>'
                   + "".join(f"<tr><th>{key}</th><td>{fmt(base.get(key))}</td><td>{fmt(dev.get(key))}</td></tr>"
                             for key in ("loss", "perplexity")) + "</table>")
    generation = report.get("generation")
    if isinstance(generation, dict):
        names = sorted(generation.get("adapted", {}))
        out.append('<h2>generation</h2><table><tr><th></th>' + "".join(f"<th>{escape(n)}</th>" for n in names) + "</tr>"
                   + "".join(f"<tr><th>{side}</th>" + "".join(f"<td>{fmt(generation.get(side, {}).get(n))}</td>"
                                                             for n in names) + "</tr>" for side in ("base", "adapted"))
                   + "</table>")
        rows = "".join(f"<tr><td>{escape(e.get('prompt', ''))}</td><td>{escape(e.get('reference', ''))}</td>"
                       f"<td>{escape(e.get('base', ''))}</td><td>{escape(e.get('adapted', ''))}</td></tr>"
                       for e in generation.get("examples", []))
        out.append('<table id="generations"><tr><th>prompt</th><th>reference</th><th>base</th><th>adapted</th></tr>'
                   f"{rows}</table>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------- compare
def compare_page(runs: list[dict]) -> str:
    loss, metric = [], []
    for run in runs:
        train, dev = curves(run["history"])[0]
        loss.append((f'{run["path"]} train', train[1]))
        loss.append((f'{run["path"]} dev', dev[1]))
        name = f'dev_{run["metric"]}'
        metric.append((run["path"], [(h["step"], h[name]) for h in run["history"] if name in h]))
    header = "".join(f"<th>{run_link(r['path'])}</th>" for r in runs)
    keys = sorted({k for r in runs for split in SPLITS for k, v in (r["report"].get(split) or {}).items()
                   if isinstance(v, (int, float))})
    metric_rows = [("trainable", ["–" if r["trainable_share"] is None else f'{100 * r["trainable_share"]:.3f}%' for r in runs]),
                   ("train time", [duration(r["seconds"]) for r in runs])]
    for split in SPLITS:
        metric_rows += [(f"{split} {k}", [fmt((r["report"].get(split) or {}).get(k)) for r in runs]) for k in keys
                        if any(k in (r["report"].get(split) or {}) for r in runs)]
    flat = [flatten_keys(r["config"]) for r in runs]
    differing = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)
    body = ['<div class="charts">', line_chart(loss, "loss", "compare-loss", y_label="loss"),
            line_chart(metric, f"dev {runs[0]['metric']}", "compare-metric"), "</div>",
            f'<h2>metrics</h2><table id="compare-metrics"><tr><th></th>{header}</tr>'
            + "".join(f"<tr><th>{escape(n)}</th>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                      for n, values in metric_rows) + "</table>",
            f'<h2>config differences</h2><table id="config-diff"><tr><th>key</th>{header}</tr>'
            + "".join(f"<tr><th>{escape(k)}</th>" + "".join(f"<td>{fmt(f.get(k))}</td>" for f in flat) + "</tr>"
                      for k in differing) + "</table>"]
    return page(f"compare {len(runs)} runs", "".join(body))




# ----------------------------------------------------------------------------------------------------- searches
def searches_page(studies: list[dict]) -> str:
    rows = "".join(f'<tr><td><a href="/search?{urlencode({"p": s["path"]})}">{escape(s["path"])}</a></td>'
                   f'<td>{s["trials"]}</td><td>{fmt(s["best_number"])}</td></tr>' for s in studies)
    return page("searches", f'<table id="studies"><tr><th>study</th><th>trials</th><th>best trial</th></tr>{rows}</table>'
                if studies else "<p>no search folders (summary.json or study.db) under --runs</p>")


def search_page(study: dict) -> str:
    summary, trials = study["summary"], study["trials"]
    objectives = summary.get("objectives", ["value"])
    best = summary.get("best") or []
    done = [(t["number"], t["values"][0]) for t in trials if t.get("values")]
    best_so_far, current = [], None
    sign = -1 if (summary.get("directions") or ["maximize"])[0] == "minimize" else 1
    for number, value in done:
        current = value if current is None or sign * value > sign * current else current
        best_so_far.append((number, current))
    history = line_chart([(objectives[0], done), ("best so far", best_so_far)], "optimisation history",
                         "search-history", x_label="trial")
    head = "".join(f"<th>{escape(o)}</th>" for o in objectives)
    rows = "".join(
        f'<tr class="{"best" if any(b["number"] == t["number"] for b in best) else ""}"><td>{t["number"]:03d}</td>'
        f'<td>{escape(t["state"])}</td>' + "".join(f"<td>{fmt(v)}</td>" for v in (t.get("values") or [None] * len(objectives)))
        + f'<td>{duration(t.get("seconds"))}</td><td>{escape(", ".join(f"{k}={fmt(v, 3)}" for k, v in t["params"].items()))}</td>'
        f'<td>{run_link(t["run"], "run") if t.get("run") else ""}</td></tr>' for t in trials)
    best_text = "".join(f'<p id="best">best trial <b>{b["number"]:03d}</b>: '
                        + ", ".join(f"{n} {fmt(v)}" for n, v in zip(objectives, b["values"]))
                        + " — " + escape(", ".join(f"{k}={v}" for k, v in b["params"].items())) + "</p>" for b in best[:1])
    images = "".join(f'<img alt="{escape(p)}" src="/file?{urlencode({"p": p})}">' for p in study["plots"])
    body = (best_text + history + f'<h2>trials</h2><table id="trials"><tr><th>#</th><th>state</th>{head}<th>time</th>'
            f'<th>params</th><th></th></tr>{rows}</table><h2>plots</h2>{images or "<p>none written yet</p>"}')
    return page(f"search {study['path']}", body)


# ----------------------------------------------------------------------------------------------------- try it
def try_page(runs: list[dict], chosen: Sequence[str], text: str, answers: list[dict], server: str | None) -> str:
    boxes = "".join(f'<label><input type="checkbox" name="runs" value="{escape(r["path"])}"'
                    f'{" checked" if r["path"] in chosen else ""}> {escape(r["path"])} ({escape(str(r["task"]))})</label><br>'
                    for r in runs if r["state"] == "finished")
    where = f"through the server {escape(server)}" if server else "in this process, from each run folder"
    form = (f'<form action="/try" method="get" id="try-form"><p>predictions {where}</p>'
            f'<textarea name="text" rows="3" cols="70" id="try-text">{escape(text)}</textarea><br>{boxes}'
            '<button type="submit" id="try-submit">predict</button></form>')
    rows = "".join(f'<tr data-run="{escape(a["run"])}"><td>{run_link(a["run"])}</td>'
                   f'<td class="label">{escape(str(a.get("label", "")))}</td>'
                   f'<td><pre>{escape(json.dumps(a.get("row", a.get("error")), ensure_ascii=False, indent=1))}</pre></td></tr>'
                   for a in answers)
    table = (f'<table id="answers"><tr><th>run</th><th>answer</th><th>details</th></tr>{rows}</table>' if answers else "")
    return page("try it", form + table)
