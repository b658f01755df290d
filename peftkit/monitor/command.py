"""``peftkit monitor``: classify a stream of JSON lines with a run and raise alerts when rules hold.

    peftkit monitor --run RUN --input FILE|- [--follow] [--listen HOST:PORT] (--rule RULE ... | --rules FILE)
                    [--group-by FIELD] [--alerts alerts.jsonl] [--webhook URL] [--state DIR] [--batch N]

Each input line is a JSON object with ``text`` and optionally ``time`` (epoch seconds or ISO 8601), ``source`` and
any field to group by (``entity``, ``ticker``). Empty lines are skipped; malformed lines are counted and reported
with their line number, never fatal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .rules import __doc__ as RULES_DOC
from .stream import MonitorError

HELP = (__doc__ or "") + "\nRules:\n" + (RULES_DOC or "").split("\n", 2)[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a classification run folder (or a merged folder)")
    parser.add_argument("--input", required=True, help="a JSON-lines file, or - for standard input")
    parser.add_argument("--follow", action="store_true", help="keep reading the file as it grows (like tail -f)")
    parser.add_argument("--rule", action="append", default=[], help="an alert rule (repeat for several)")
    parser.add_argument("--rules", help="a file of rules, one per line (# starts a comment)")
    parser.add_argument("--group-by", "--group_by", dest="group_by", help="field whose value gets its own windows")
    parser.add_argument("--alerts", help="append alerts to this JSON-lines file (default: print them)")
    parser.add_argument("--webhook", help="POST each alert (JSON) to this URL, retried with exponential backoff")
    parser.add_argument("--dead-letter", "--dead_letter", dest="dead_letter",
                        help="alerts the webhook did not take (default: dead_letter.jsonl in --state, else beside "
                             "--alerts, else in the current folder)")
    parser.add_argument("--webhook-retries", "--webhook_retries", dest="webhook_retries", type=int, default=5)
    parser.add_argument("--webhook-backoff", "--webhook_backoff", dest="webhook_backoff", type=float, default=0.5,
                        help="seconds before the first retry (doubled each time, at most 60)")
    parser.add_argument("--state", help="folder for the saved offset, windows and alerts: a restart resumes there")
    parser.add_argument("--batch", type=int, default=32, help="lines classified together")
    parser.add_argument("--top", type=int, default=3, help="examples per alert (highest score of the rule's label)")
    parser.add_argument("--listen", help="HOST:PORT for Prometheus /metrics (records/s, lag, alerts)")
    parser.add_argument("--poll", type=float, default=0.5, help="with --follow: seconds between looks at the file")
    parser.add_argument("--idle-exit", "--idle_exit", dest="idle_exit", type=float, default=None,
                        help="with --follow: stop after this many seconds without a new line")


def rules_of_file(path: Path) -> list:
    """The rules of a rules file; an error names the file's line."""
    from .rules import RuleError, parse_rule

    rules = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                rules.append(parse_rule(text))
            except RuleError as err:
                raise RuleError(f"{path} line {number}: {err}") from None
    return rules


def run_classifier(path: str):
    """The classify function of a run folder (the path of ``peftkit predict``) and its labels."""
    from ..train.run import Run

    run = Run(path)
    if run.task.name != "classification":
        raise MonitorError(f"{path} is a {run.task.name} run; the monitor needs a classification run")
    return (lambda texts: run.predict(run.task.inputs(list(texts)))), run.task.names(run.vocabulary)


def run(args: argparse.Namespace, classifier=None) -> int:
    """The command; ``classifier`` (classify function, labels) replaces the run's (tests)."""
    from .alerts import Delivery
    from .monitor import Monitor, Options, stop_on_signals
    from .rules import check_labels, parse_rule

    rules = [parse_rule(text) for text in args.rule] + (rules_of_file(Path(args.rules)) if args.rules else [])
    if not rules:  # parsed before the model loads: a typo fails at once
        raise MonitorError("no rules: give --rule RULE (repeat for several) or --rules FILE")
    if args.batch < 1 or args.top < 0 or args.webhook_retries < 0 or args.webhook_backoff < 0 or args.poll <= 0:
        raise MonitorError("--batch must be at least 1, --poll above 0, and --top, --webhook-retries and "
                           "--webhook-backoff not negative")
    if args.follow and args.input == "-":
        raise MonitorError("--follow tails a file; standard input is read until it ends anyway, so drop --follow")
    if args.input != "-" and not Path(args.input).is_file():
        raise MonitorError(f"--input {args.input}: no such file; give a JSON-lines file or - for standard input")
    state = Path(args.state) if args.state else None
    alerts = Path(args.alerts) if args.alerts else None
    dead = Path(args.dead_letter) if args.dead_letter else (
        state / "dead_letter.jsonl" if state else alerts.with_name(alerts.stem + ".dead_letter.jsonl") if alerts
        else Path("dead_letter.jsonl"))
    delivery = Delivery(alerts, args.webhook, dead, args.webhook_retries, args.webhook_backoff)
    metrics = None
    if args.listen:
        from .metrics import MonitorMetrics

        metrics = MonitorMetrics()
    classify, labels = classifier or run_classifier(args.run)
    check_labels(rules, labels)
    options = Options(args.input, rules, args.group_by, state, args.batch, args.follow, args.poll, args.top,
                      args.idle_exit)
    monitor = Monitor(classify, options, delivery, metrics)
    if metrics is not None:
        metrics.listen(args.listen)
        print(f"monitor: metrics on http://{args.listen}/metrics", file=sys.stderr, flush=True)
    try:
        with stop_on_signals(monitor):
            totals = monitor.run()
    finally:
        if metrics is not None:
            metrics.close()
    print(f"monitor: {totals.records} records classified, {totals.malformed} malformed and {totals.empty} empty "
          f"lines skipped, {totals.alerts} alerts" + (f"; state in {state}" if state else ""), file=sys.stderr)
    return 0
