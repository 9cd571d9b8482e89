"""The benchmark suite's report and compare logic (bench/suite.py), on synthetic JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

suite = pytest.importorskip("bench.suite")


def stat(median: float, lo: float | None = None, hi: float | None = None) -> dict:
    return {"median": median, "min": median if lo is None else lo,
            "max": median if hi is None else hi, "n": 3}


def relay_json(mb: float = 300.0, p50: float = 1.5, kib: float = 4.0) -> dict:
    return {
        "benchmark": "relay_vs_openssh", "date": "2026-11-28T18:00:00+00:00", "commit": "abc1234",
        "conditions": {"cpu_model": "Test CPU", "nproc": 2, "kernel": "6.1", "python": "3.11",
                       "bytes": 2**28, "runs": 3, "link_cipher": "aes128-gcm@openssh.com"},
        "paths": {"relay": {"label": "relay+agent, public port"}, "ssh": {"label": "ssh -R"}},
        "throughput": {"push": {
            "relay": {"mb_per_s": stat(mb, mb - 10, mb + 10),
                      "cpu_s_per_gib": {"relay": stat(2.0), "agent": stat(1.5)}},
            "ssh": {"mb_per_s": stat(250.0), "cpu_s_per_gib": {}},  # no CPU figures: fine
        }},
        "setup_latency": {"back_to_back": {
            "relay": {"p50_ms": stat(p50), "p99_ms": stat(5.0), "ms": [[1.0, 1.5, 2.0]]},
            "ssh": {"p50_ms": stat(43.0)},  # no p99, no samples
        }},
        "interactive_under_bulk": {"relay": {"p50_ms": stat(4.0), "p99_ms": stat(11.0)}},
        "idle_sessions": {"relay": {"requested": 100, "kib_per_session": {"relay": kib,
                                                                           "agent": 4.2}},
                          "ssh": {"requested": 100, "kib_per_session": {"ssh": 33.0}}},
        "ratios": {"push_relay_over_ssh": mb / 250.0},
        "goals": [{"goal": "throughput push >= 0.75", "value": mb / 250.0, "status": "PASS"},
                  "not a dict"],
    }


def test_key_figures_are_defensive_and_directional() -> None:
    figs = suite.key_figures("relay", relay_json())
    assert figs["relay.throughput.push.relay.mb_per_s"]["value"] == 300.0
    assert figs["relay.throughput.push.relay.mb_per_s"]["better"] == "higher"
    assert figs["relay.setup.back_to_back.relay.p50_ms"]["better"] == "lower"
    assert figs["relay.memory_per_session.relay.relay_kib"]["better"] == "lower"
    assert figs["relay.echo_under_bulk.relay.p99_ms"]["better"] == "lower"
    assert figs["relay.ratio.push_relay_over_ssh"]["better"] == "higher"
    assert figs["relay.throughput.push.relay.cpu_s_per_gib.relay"]["better"] == "lower"
    assert suite.lower_is_better("relay.ratio.setup_p50_back_to_back_relay_over_ssh", "×")
    assert not suite.lower_is_better("plain_hop.bulk.c.ratio_to_direct", "×")
    assert "relay.setup.back_to_back.ssh.p99_ms" not in figs
    assert suite.key_figures("agent", {}) == {}
    assert suite.key_figures("plain_hop", {"series": [None, {"path": "c"}]}) == {}


def test_report_has_tables_and_goals() -> None:
    combined = suite.combine({"relay": relay_json()}, {"relay": "x.json"}, "abc1234",
                             "2026-11-28T18:00:00+00:00")
    md = suite.markdown(combined, [], "matplotlib is not installed")
    assert "| relay | relay+agent, public port | 300.0 (290.0–310.0) |" in md
    assert "**PASS**" in md and "Test CPU" in md and "matplotlib is not installed" in md
    assert json.loads(json.dumps(combined))["suite"] == suite.SUITE_ID


def test_compare_flags_more_than_15_percent_worse_by_direction() -> None:
    def comb(**kw: float) -> dict:
        return suite.combine({"relay": relay_json(**kw)}, {}, "c", "2026-11-28")

    old = comb()
    rows = {r["figure"]: r for r in suite.compare(comb(mb=240.0, p50=1.6, kib=5.0), old)}
    assert rows["relay.throughput.push.relay.mb_per_s"]["worse"]      # 0.80 of before
    assert not rows["relay.setup.back_to_back.relay.p50_ms"]["worse"]  # 1.07: within 15 %
    assert rows["relay.memory_per_session.relay.relay_kib"]["worse"]   # 1.25: more memory
    better = {r["figure"]: r for r in suite.compare(comb(mb=400.0, p50=0.5), old)}
    assert not any(r["worse"] for r in better.values())
    text = suite.format_compare(list(rows.values()), "old.json")
    assert "!!" in text and "old.json" in text


def test_previous_combined_skips_suite_files_and_the_new_one(tmp_path: Path) -> None:
    assert suite.previous_combined(tmp_path, None) is None
    (tmp_path / "relay_vs_openssh-2026-11-28-abc1234.json").write_text("{}")
    (tmp_path / "2026-11-27-aaaaaaa.json").write_text(json.dumps({"suite": suite.SUITE_ID}))
    new = tmp_path / "2026-11-28-bbbbbbb.json"
    new.write_text(json.dumps({"suite": suite.SUITE_ID}))
    assert suite.previous_combined(tmp_path, new) == tmp_path / "2026-11-27-aaaaaaa.json"
    assert suite.previous_combined(tmp_path, None) == new
