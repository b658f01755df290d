"""peftkit monitor with a stub classifier (the classifier is beside the point here): rules, windows, exact alerts,
malformed lines, restart from the state, webhook delivery, --follow and /metrics."""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from monitor_helpers import LABELS, T0, free_port, read_alerts, stream, stub_classify, write_lines
from peftkit.monitor.command import add_arguments, run
from peftkit.monitor.rules import RuleError, parse_rule

SHARES = [0.2, 0.2, 0.2, 0.5, 0.5, 0.5, 0.1, 0.5, 0.5, 0.5]  # negative share of each block of 100 records


def monitor(*argv, classify=stub_classify) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(["--run", "stub", *map(str, argv)]), classifier=(classify, LABELS))


# ------------------------------------------------------------------------------------------------ grammar
def test_rules_parse_into_their_meaning():
    rule = parse_rule("share(negative) > 0.35 over 200 for 2 windows")
    assert (rule.measure, rule.label, rule.compare, rule.threshold, rule.length, rule.step, rule.by_time,
            rule.repeat) == ("share", "negative", ">", 0.35, 200, 200, False, 2)
    rule = parse_rule("COUNT( negative ) >= 20 in 10m every 1m")
    assert (rule.measure, rule.label, rule.length, rule.step, rule.by_time, rule.repeat) == \
        ("count", "negative", 600, 60, True, 1)
    assert parse_rule("share(neutral)<=0.5 over 50 records every 1 records for 1 window").step == 1


@pytest.mark.parametrize("text, column, expected", [
    ("share(negative) > 0.35 ovr 200", 24, "expected 'over N'"),
    ("mean(negative) > 0.35 over 200", 1, "'share(LABEL)' or 'count(LABEL)'"),
    ("share(negative) = 0.35 over 200", 17, "a comparison"),
    ("share(negative) > 1.5 over 200", 19, "a share between 0 and 1"),
    ("count(negative) >= 20 in 10", 26, "a duration such as 30s"),
    ("count(negative) >= 20 in 10m for 2", 35, "'windows'"),
    ("share(negative) > 0.3 over 0", 28, "at least 1"),
    ("share() > 0.3 over 10", 6, "a label inside the parentheses"),
    ("share(negative) > 0.3 over 10 extra", 31, "the end of the rule"),
])
def test_bad_rules_name_the_column_and_the_fix(text, column, expected):
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    message = str(info.value)
    assert f"column {column}" in message and expected in message and "over 200 for 2 windows" in message


def test_bad_rule_exits_2_from_the_cli(tmp_path, capsys):
    from peftkit.cli import main

    data = write_lines(tmp_path / "in.jsonl", stream([0.5]))
    code = main(["monitor", "--run", str(tmp_path / "no-run"), "--input", str(data), "--rule", "share(negative) > 0.3 ovr 10"])
    err = capsys.readouterr().err
    assert code == 2 and "column 23" in err and "Traceback" not in err
    with pytest.raises(RuleError, match="'every' .*longer than the window"):
        monitor("--input", data, "--rule", "share(negative) > 0.3 over 10 every 20")
    with pytest.raises(RuleError, match="label 'negatve' is not one of the run's labels"):
        monitor("--input", data, "--rule", "share(negatve) > 0.3 over 10")


# ------------------------------------------------------------------------------------------ exact alerts
def test_count_windows_fire_once_per_crossing_at_the_known_records(tmp_path):
    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    alerts = tmp_path / "alerts.jsonl"
    assert monitor("--input", data, "--rule", "share(negative) > 0.35 over 100 for 2 windows", "--alerts", alerts) == 0
    got = read_alerts(alerts)
    # windows end at 100, 200, ...; the share is 0.5 in windows 4-6 and 8-10: two in a row first at 500 and 900
    assert [(a["window"]["first_line"], a["window"]["last_line"]) for a in got] == [(401, 500), (801, 900)]
    first = got[0]
    assert first["records"] == 100 and first["counts"] == {"negative": 50, "neutral": 50}
    assert first["shares"] == {"negative": 0.5, "neutral": 0.5} and first["value"] == 0.5
    assert first["rule"] == "share(negative) > 0.35 over 100 for 2 windows" and first["group"] == "*"
    assert first["window"]["windows_in_a_row"] == 2
    # the top examples: the window's negatives with the highest scores, best first
    negatives = [json.loads(line) for line in data.read_text().splitlines()[400:500]]
    negatives = sorted((float(r["text"].split()[1]), -int(r["text"].split()[3])) for r in negatives
                       if r["text"].startswith("negative"))
    assert [e["score"] for e in first["examples"]] == [round(s, 4) for s, _ in negatives[::-1][:3]]
    assert all(e["label"] == "negative" and e["source"] == "sim" for e in first["examples"])


def test_sliding_and_time_windows(tmp_path):
    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    alerts = tmp_path / "alerts.jsonl"
    assert monitor("--input", data, "--alerts", alerts,
                   "--rule", "count(negative) >= 30 in 10m",  # one record every 6 s: a block is ten minutes
                   "--rule", "share(negative) >= 0.5 over 100 every 10") == 0
    got = read_alerts(alerts)
    timed = [a for a in got if a["rule"].startswith("count")]
    # a ten-minute window closes when the first record after it arrives, so the last block is never evaluated
    assert [(a["window"]["first_line"], a["window"]["last_line"], a["value"]) for a in timed] == \
        [(301, 400, 50), (701, 800, 50)]
    assert timed[0]["window"]["start"] == "2023-11-14T22:50:00Z" and timed[0]["window"]["end"] == "2023-11-14T23:00:00Z"
    sliding = [a["window"]["last_line"] for a in got if a["rule"].startswith("share")]
    # slides by 10: the share reaches 0.5 when the window is all block 4 (line 400); it dips below when block 7's
    # 0.1 enters and reaches 0.5 again at line 800
    assert sliding == [400, 800]


def test_groups_have_their_own_windows(tmp_path):
    rows = [r for pair in zip(stream([0.1, 0.6, 0.6], group="ACME"), stream([0.1, 0.1, 0.1], group="INIT"))
            for r in pair]
    data = write_lines(tmp_path / "in.jsonl", rows)
    alerts = tmp_path / "alerts.jsonl"
    assert monitor("--input", data, "--group-by", "ticker", "--alerts", alerts,
                   "--rule", "share(negative) > 0.35 over 100") == 0
    got = read_alerts(alerts)
    assert [(a["group"], a["records"], a["counts"]["negative"]) for a in got] == [("ACME", 100, 60)]
    assert got[0]["window"]["last_line"] == 399  # ACME's 200th record: the lines alternate ACME, INIT


def test_malformed_and_empty_lines_are_counted_and_skipped(tmp_path, capsys):
    good = stream([0.5])
    lines = good[:10] + ["", "   ", "{not json", "[1, 2]", '{"text": ""}', '{"text": "negative 0.9", "time": "yesterday"}',
                         '{"time": 5}'] + good[10:]
    data = write_lines(tmp_path / "in.jsonl", lines)
    data.write_bytes(data.read_bytes() + b'\xff\xfe{"text": 1}\n' + json.dumps(good[0]).encode())  # no final newline
    alerts = tmp_path / "alerts.jsonl"
    state = tmp_path / "state"
    assert monitor("--input", data, "--alerts", alerts, "--state", state, "--rule", "count(negative) >= 50 over 100") == 0
    err = capsys.readouterr().err
    assert "line 13: skipped, not JSON" in err and "line 14: skipped, a JSON list" in err
    assert "line 15: skipped, no 'text'" in err and "line 16: skipped, bad 'time' 'yesterday'" in err
    assert "line 17: skipped, no 'text'" in err and "line 108: skipped, not UTF-8" in err
    totals = json.loads((state / "state.json").read_text())["totals"]
    assert totals == {"records": 101, "malformed": 6, "empty": 2, "alerts": 1, "extra": {}}
    assert "101 records classified, 6 malformed and 2 empty lines skipped, 1 alerts" in err
    # the 100th good record is line 107; the last line (109, no final newline) is the 101st
    assert [(a["window"]["first_line"], a["window"]["last_line"]) for a in read_alerts(alerts)] == [(1, 107)]


# ----------------------------------------------------------------------------------- restart / exactly once
class Killed(BaseException):
    """The process dying at that point (nothing after it runs)."""


def test_restart_delivers_the_outbox_once_and_resumes_at_the_offset(tmp_path, monkeypatch):
    from peftkit.monitor import alerts as A

    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    alerts, state = tmp_path / "alerts.jsonl", tmp_path / "state"
    rule = ["--rule", "share(negative) > 0.35 over 100 for 2 windows"]
    real = A.append_line
    calls = []

    def crash_after_writing(path, data):  # the first alert reaches the file, then the process "dies"
        real(path, data)
        calls.append(data["id"])
        with open(path, "a") as handle:
            handle.write('{"id": "half a line')  # and a second write was cut off mid-line
        raise Killed

    monkeypatch.setattr(A, "append_line", crash_after_writing)
    with pytest.raises(Killed):
        monitor("--input", data, "--alerts", alerts, "--state", state, "--batch", "64", *rule)
    saved = json.loads((state / "state.json").read_text())
    assert len(saved["outbox"]) == 1 and saved["input"]["line"] == 512  # saved with the batch, before delivery
    monkeypatch.setattr(A, "append_line", real)
    assert monitor("--input", data, "--alerts", alerts, "--state", state, "--batch", "64", *rule) == 0
    got = read_alerts(alerts)  # the cut-off line is gone, the first alert is there once
    assert [a["window"]["last_line"] for a in got] == [500, 900]
    final = json.loads((state / "state.json").read_text())
    assert final["totals"]["records"] == 1000 and final["outbox"] == [] and final["totals"]["alerts"] == 2
    # a third start reads nothing new and raises nothing
    assert monitor("--input", data, "--alerts", alerts, "--state", state, *rule) == 0
    assert len(read_alerts(alerts)) == 2


def test_state_refuses_other_rules_or_a_shorter_input(tmp_path):
    from peftkit.monitor.stream import MonitorError

    data = write_lines(tmp_path / "in.jsonl", stream([0.5, 0.5]))
    state = tmp_path / "state"
    assert monitor("--input", data, "--state", state, "--rule", "count(negative) >= 5 over 10") == 0
    with pytest.raises(MonitorError, match="written for rules"):
        monitor("--input", data, "--state", state, "--rule", "count(negative) >= 6 over 10")
    write_lines(data, stream([0.5]))
    with pytest.raises(MonitorError, match="truncated or replaced"):
        monitor("--input", data, "--state", state, "--rule", "count(negative) >= 5 over 10")


# -------------------------------------------------------------------------------------------------- webhook
class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers["Idempotency-Key"], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_down_then_up_gets_each_alert_once(tmp_path, capsys):
    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    port = free_port()
    _Receiver.received = []
    up, servers = threading.Event(), []

    def receiver():  # nothing listens on the port for the first second
        time.sleep(1.0)
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), _Receiver))
        up.set()
        servers[0].serve_forever()

    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        assert monitor("--input", data, "--webhook", f"http://127.0.0.1:{port}/hook", "--webhook-retries", "8",
                       "--webhook-backoff", "0.1", "--state", tmp_path / "state",
                       "--rule", "share(negative) > 0.35 over 100 for 2 windows") == 0
    finally:
        up.wait(10)
        servers[0].shutdown()
        thread.join()
        servers[0].server_close()
    assert "retry 1 of 8" in capsys.readouterr().err  # the first POST was refused
    assert [(key, body["window"]["last_line"]) for key, body in _Receiver.received] == \
        [("rule1/*/line500", 500), ("rule1/*/line900", 900)]
    assert not (tmp_path / "state" / "dead_letter.jsonl").exists()


def test_undeliverable_alerts_go_to_the_dead_letter_file(tmp_path, capsys):
    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    alerts = tmp_path / "alerts.jsonl"
    assert monitor("--input", data, "--alerts", alerts, "--webhook", f"http://127.0.0.1:{free_port()}/hook",
                   "--webhook-retries", "2", "--webhook-backoff", "0.01",
                   "--rule", "share(negative) > 0.35 over 100 for 2 windows") == 0
    dead = read_alerts(tmp_path / "alerts.dead_letter.jsonl")
    assert [d["alert"]["id"] for d in dead] == [a["id"] for a in read_alerts(alerts)] and len(dead) == 2
    assert dead[0]["attempts"] == 3 and "ConnectError" in dead[0]["error"]
    assert "not delivered" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- follow, /metrics
def test_follow_reads_appended_lines_and_serves_metrics(tmp_path):
    records = stream(SHARES[:6])
    data = write_lines(tmp_path / "in.jsonl", records[:250])
    alerts, port = tmp_path / "alerts.jsonl", free_port()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", monitor(
        "--input", data, "--follow", "--poll", "0.05", "--idle-exit", "3", "--alerts", alerts,
        "--listen", f"127.0.0.1:{port}", "--rule", "share(negative) > 0.35 over 100 for 2 windows")))
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline:  # the metrics server is up once the monitor runs
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            if "peftkit_monitor_records_total 250.0" in text:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    assert "peftkit_monitor_records_total 250.0" in text and "peftkit_monitor_lag_bytes 0.0" in text
    with open(data, "a", encoding="utf-8") as handle:
        for record in records[250:]:
            line = json.dumps(record) + "\n"
            handle.write(line[:10])  # a writer caught mid-line: the monitor must wait for the rest
            handle.flush()
            handle.write(line[10:])
        handle.flush()
    thread.join(60)
    assert result["code"] == 0
    assert [a["window"]["last_line"] for a in read_alerts(alerts)] == [500]
    assert not thread.is_alive()


def test_time_without_a_time_field_is_the_arrival_time(tmp_path):
    from peftkit.monitor.stream import parse_time

    data = write_lines(tmp_path / "in.jsonl", [{"text": "negative 0.9"}] * 3 + [{"text": "neutral 0.9", "time": T0}])
    alerts = tmp_path / "alerts.jsonl"
    before = time.time()
    assert monitor("--input", data, "--alerts", alerts, "--rule", "count(negative) >= 3 over 3") == 0
    window = read_alerts(alerts)[0]["window"]
    assert before - 1 <= parse_time(window["first_time"]) <= parse_time(window["last_time"]) <= time.time() + 1


def test_rules_file_and_its_errors(tmp_path, capsys):
    from peftkit.cli import main

    data = write_lines(tmp_path / "in.jsonl", stream(SHARES))
    rules, alerts = tmp_path / "rules.txt", tmp_path / "alerts.jsonl"
    rules.write_text("# comment\n\nshare(negative) > 0.35 over 100 for 2 windows   # sustained\n", encoding="utf-8")
    assert monitor("--input", data, "--rules", rules, "--alerts", alerts) == 0
    assert [a["window"]["last_line"] for a in read_alerts(alerts)] == [500, 900]
    rules.write_text("share(negative) > 0.35 over 100\ncount(negative) >= 2 in 10\n", encoding="utf-8")
    assert main(["monitor", "--run", "x", "--input", str(data), "--rules", str(rules)]) == 2
    assert f"{rules} line 2: rule 'count(negative) >= 2 in 10': at column 25" in capsys.readouterr().err
    assert main(["monitor", "--run", "x", "--input", str(data)]) == 2
    assert "no rules: give --rule RULE" in capsys.readouterr().err
