"""The reliability benchmark: its verdicts fail on each missed target, and its smoke run against the demo app
(started as a user starts it) meets them all."""
import copy
import json

import pytest

from clip4cir.benchmarks import reliability
from clip4cir.commands.benchmark import main

MET = {"good": {"sent": 10, "identical_to_serial": 10, "status": {"200": 10}, "p50_ms": 50.0, "p99_ms": 90.0},
       "quiet": {"sent": 20, "identical_to_serial": 20, "status": {"200": 20}, "p50_ms": 40.0, "p99_ms": 60.0},
       "hostile": {"k NaN": {"sent": 3, "status": {"422": 3}, "unexpected": 0, "leaks": 0, "oversized": 0}},
       "idle_rss_gb": 1.0, "peak_rss_gb": 1.4}


def missed(change) -> list[str]:
    result = copy.deepcopy(MET)
    change(result)
    return [name for name, met in reliability.verdicts(result).items() if met is False]


def test_each_missed_target_fails_the_run():
    assert missed(lambda r: None) == []
    assert missed(lambda r: r["hostile"]["k NaN"].update(status={"422": 2, "500": 1})) == ["no 5xx"]
    assert missed(lambda r: r["hostile"]["k NaN"].update(unexpected=1)) == ["hostile statuses as expected"]
    assert missed(lambda r: r["hostile"]["k NaN"].update(sent=0)) == ["hostile statuses as expected"]
    assert missed(lambda r: r["hostile"]["k NaN"].update(oversized=1)) == ["no leaks or oversized echoes"]
    assert missed(lambda r: r["quiet"].update(identical_to_serial=19)) == ["good results identical to serial"]
    assert missed(lambda r: r.update(peak_rss_gb=2.6)) == ["peak RSS ≤ 1.5 GB above idle"]
    assert missed(lambda r: r["good"].update(p99_ms=201.0)) == ["p99 ≤ 5× quiet p50"]
    assert reliability.verdicts({**MET, "idle_rss_gb": None, "peak_rss_gb": None})[
        "peak RSS ≤ 1.5 GB above idle"] is None  # not measured is neither met nor missed


def test_leaks_are_found_in_answers():
    assert reliability._leaks(b'{"detail": "Traceback (most recent call last)"}', ())
    assert reliability._leaks(b"cannot read /home/me/app/x.png", ("/home/me/app",))
    assert not reliability._leaks(b'{"detail": "no such item"}', ("/home/me/app",))


@pytest.mark.slow
def test_the_smoke_run_against_the_demo_app_meets_every_target(tmp_path):
    assert main(["reliability", "--config", "smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "reliability-smoke.json").read_text())
    assert all(report["targets"].values()), report["targets"]
    assert report["good"]["sent"] > 0 and all(row["sent"] > 0 for row in report["hostile"].values())
    assert report["hostile"]["k NaN"]["status"] == {"422": report["hostile"]["k NaN"]["sent"]}
    assert "| k NaN |" in (tmp_path / "reliability-smoke.md").read_text()
