"""What a search leaves in its output folder, besides the trials and the storage: a table of the trials (printed),
``best.yaml`` (the best trial's config, ready for ``peftkit train best.yaml``), ``summary.json`` and the plots
(optimisation history, parameter importances, parallel coordinates; the Pareto front with several objectives)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write, write_json
from ..train.metrics import save_png
from .trial import TRIAL_CONFIG, Objective

BEST_CONFIG = "best.yaml"
SUMMARY = "summary.json"
PLOTS_DIR = "plots"
BEST_RUN_DIR = "best"


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "values": list(t.values) if t.values else None,
                     "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
                     "seconds": t.user_attrs.get("seconds"), "folder": t.user_attrs.get("folder"),
                     "retry_of": t.system_attrs.get("failed_trial")})
    return rows


def table(rows: list[dict], objective: Objective) -> str:
    header = ["#", "state", *objective.names, "seconds", "params"]
    lines = []
    for row in rows:
        values = row["values"] or [None] * len(objective.names)
        if row["state"] == "PRUNED" and row["last_reported"] is not None:
            values = [row["last_reported"], *[None] * (len(objective.names) - 1)]
        cells = [f"{row['number']:03d}", row["state"], *("-" if v is None else f"{v:.4g}" for v in values),
                 "-" if row["seconds"] is None else f"{row['seconds']:.1f}",
                 " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), *(fmt(cells) for cells in lines)])


def best_trials(study, objective: Objective) -> list:
    """The best trial (one objective) or the Pareto front, best first by the first objective."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(objective.names) == 1:
        return [study.best_trial]
    sign = 1 if objective.directions[0] == "minimize" else -1
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def write_best(output_dir: Path, trial) -> Path:
    """The best trial's config with its own output folder: ``peftkit train best.yaml`` trains it again."""
    values = yaml.safe_load((Path(trial.user_attrs["folder"]) / TRIAL_CONFIG).read_text(encoding="utf-8"))
    values.update(output_dir=str((output_dir / BEST_RUN_DIR).resolve()), quiet=False)
    text = (f"# the best trial ({trial.number:03d}) of the search in {output_dir}: peftkit train {output_dir / BEST_CONFIG}\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    path = output_dir / BEST_CONFIG
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def summary(study, settings, objective: Objective, rows: list[dict], best: list) -> dict:
    complete = [r["seconds"] for r in rows if r["state"] == "COMPLETE" and r["seconds"] is not None]
    pruned = [r["seconds"] for r in rows if r["state"] == "PRUNED" and r["seconds"] is not None]
    mean_complete = sum(complete) / len(complete) if complete else None
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {
        "study": settings.study, "storage": settings.storage_url, "objectives": objective.names,
        "directions": objective.directions, "sampler": settings.sampler, "pruner": settings.pruner,
        "trials_requested": settings.trials, "states": counts,
        "best": [{"number": t.number, "values": list(t.values), "params": dict(t.params),
                  "folder": t.user_attrs.get("folder")} for t in best],
        "pareto_front": len(objective.names) > 1,
        "seconds": {"complete_total": sum(complete), "pruned_total": sum(pruned),
                    # what the pruned trials would have cost had they run as long as an average complete trial
                    "saved_by_pruning_estimate": (max(0.0, mean_complete * len(pruned) - sum(pruned))
                                                  if mean_complete is not None else None)},
        "trials": rows,
    }


def plots(study, objective: Objective, out: Path) -> dict[str, str]:
    """The Optuna plots (matplotlib), each written atomically; a plot Optuna cannot draw yet (too few trials) is
    left out with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as V

    first = None if len(objective.names) == 1 else (lambda t: t.values[0])
    name = objective.names[0]
    wanted = {"history": lambda: V.plot_optimization_history(study, target=first, target_name=name),
              "importances": lambda: V.plot_param_importances(study, target=first, target_name=name),
              "parallel_coordinates": lambda: V.plot_parallel_coordinate(study, target=first, target_name=name)}
    if len(objective.names) in (2, 3):
        wanted["pareto_front"] = lambda: V.plot_pareto_front(study, target_names=objective.names)
    written = {}
    for key, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            path = out / f"{key}.png"
            out.mkdir(parents=True, exist_ok=True)
            save_png(figure, path)
            plt.close(figure)
            written[key] = str(path)
        except Exception as err:  # e.g. importances need two complete trials with varying parameters
            written[key] = f"not drawn: {err}"
    return written


def finish(study, settings, objective: Objective, say=print) -> dict:
    rows = trial_rows(study)
    say("\n" + table(rows, objective))
    best = best_trials(study, objective)
    result = summary(study, settings, objective, rows, best)
    result["plots"] = plots(study, objective, settings.output_dir / PLOTS_DIR)
    if best:
        result["best_config"] = str(write_best(settings.output_dir, best[0]))
        label = "best trial" if len(best) == 1 and len(objective.names) == 1 else f"Pareto front: {len(best)} trials; first"
        say(f"\n{label}: {best[0].number:03d} ({', '.join(f'{n} {v:.4g}' for n, v in zip(objective.names, best[0].values))})"
            f"\nbest config: {result['best_config']} (peftkit train {result['best_config']})")
    write_json(settings.output_dir / SUMMARY, result)
    say(f"summary: {settings.output_dir / SUMMARY}; the study opens in optuna-dashboard {settings.storage_url}")
    return result
