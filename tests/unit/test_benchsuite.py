"""The benchmark suite's report and compare logic (bench/suite.py), on synthetic JSON."""

from __future__ import annotations

import json
import subprocess
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


def relay_json(mb: float = 300.0, p50: float = 1.5, kib: float = 4.0, commit: str = "abc1234",
               date: str = "2026-11-28T18:00:00+00:00") -> dict:
    return {
        "benchmark": "relay_vs_openssh", "date": date, "commit": commit,
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


# --- the results directory: latest file per suite, history, commit order (bench/history.py)

history = pytest.importorskip("bench.history")
report = pytest.importorskip("bench.report")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def two_commits(tmp_path: Path) -> tuple[Path, str, str]:
    """A real git repository with two commits: (repo, older, newer), short ids."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "bench@example.invalid")
    git(repo, "config", "user.name", "bench")
    git(repo, "commit", "-q", "--allow-empty", "-m", "older")
    older = git(repo, "rev-parse", "--short", "HEAD")
    git(repo, "commit", "-q", "--allow-empty", "-m", "newer")
    return repo, older, git(repo, "rev-parse", "--short", "HEAD")


LATE, EARLY = "2026-12-01T12:00:00+00:00", "2026-11-01T12:00:00+00:00"


def test_commit_order_beats_recorded_dates(two_commits: tuple[Path, str, str]) -> None:
    repo, older, newer = two_commits
    warnings: list[str] = []
    order = history.CommitOrder(repo, warnings.append)
    # the older commit's run was recorded later (a rerun, a skewed clock): commits decide
    runs = [(newer, EARLY), (older, LATE), (older + "+changes", "2026-11-02 10:00 UTC")]
    ranked = order.sort(runs, lambda r: r)
    assert ranked == [(older + "+changes", "2026-11-02 10:00 UTC"), (older, LATE),
                      (newer, EARLY)]
    assert warnings == []


def test_commit_order_falls_back_to_dates_with_a_warning(
        two_commits: tuple[Path, str, str]) -> None:
    repo, older, newer = two_commits
    runs = [(older, LATE), (newer, EARLY)]
    warnings: list[str] = []
    assert history.CommitOrder(None, warnings.append).sort(runs, lambda r: r) == \
        [(newer, EARLY), (older, LATE)]
    assert len(warnings) == 1 and "no git repository" in warnings[0]
    warnings.clear()
    runs.append(("deadbee", "2026-11-15T00:00:00+00:00"))
    assert history.CommitOrder(repo, warnings.append).sort(runs, lambda r: r)[1][0] == \
        "deadbee"
    assert len(warnings) == 1 and "deadbee" in warnings[0]


def test_a_run_overwrites_its_latest_file_and_appends_history(tmp_path: Path) -> None:
    report.write_results(tmp_path, relay_json(commit="aaaaaaa", date=EARLY), "# report one")
    report.write_results(tmp_path, relay_json(mb=240.0, commit="bbbbbbb", date=LATE),
                         "# report two")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "history.jsonl", "relay_vs_openssh-latest.json", "relay_vs_openssh-latest.md"]
    latest = json.loads((tmp_path / "relay_vs_openssh-latest.json").read_text())
    assert latest["commit"] == "bbbbbbb"
    assert (tmp_path / "relay_vs_openssh-latest.md").read_text().startswith("# report two")
    text = (tmp_path / "history.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [(x["suite"], x["commit"], x["date"]) for x in lines] == [
        ("relay", "aaaaaaa", EARLY), ("relay", "bbbbbbb", LATE)]
    assert lines[1]["figures"] == {"ratio.push_relay_over_ssh": 0.96}
    assert lines[1]["goals"] == {"throughput push >= 0.75": [0.96, "PASS"]}
    assert lines[1]["runs"] == 3 and lines[1]["dirty"] is False
    assert max(len(x) for x in text.splitlines()) < 500  # compact: the full JSON stays out
    assert history.line_figures(lines[0]) == {"relay.ratio.push_relay_over_ssh": {"value": 1.2}}


def test_latest_result_is_picked_by_commit_not_by_date(
        tmp_path: Path, two_commits: tuple[Path, str, str]) -> None:
    repo, older, newer = two_commits
    a, b = tmp_path / "a", tmp_path / "b"
    history.write_latest(a, "relay_vs_openssh", relay_json(commit=newer, date=EARLY), "")
    history.write_latest(b, "relay_vs_openssh", relay_json(commit=older, date=LATE), "")
    order = history.CommitOrder(repo, pytest.fail)
    found = history.latest_result("relay_vs_openssh", [b, a], order)
    assert found is not None and found[0] == a / "relay_vs_openssh-latest.json"
    assert history.latest_result("fast_path", [a, b], order) is None


def test_report_only_and_compare_use_the_previous_run_by_commit(
        tmp_path: Path, two_commits: tuple[Path, str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    repo, older, newer = two_commits
    results = tmp_path / "results"
    # three runs, appended out of order; the latest file is the newer commit's
    history.write_latest(results, "relay_vs_openssh", relay_json(mb=400.0, commit=older,
                                                                   date=EARLY), "")
    history.write_latest(results, "relay_vs_openssh", relay_json(mb=250.0, commit="0000000",
                                                                   date=LATE), "")
    lines = (results / "history.jsonl").read_text().splitlines()
    (results / "history.jsonl").write_text(lines[0] + "\n")  # drop the run not in the repo
    history.write_latest(results, "relay_vs_openssh", relay_json(mb=240.0, commit=newer,
                                                                   date=EARLY), "")
    code = suite.main(["--report-only", "--compare", "--only", "relay,agent",
                       "--results-dir", str(results)], repo=repo)
    out = capsys.readouterr().out
    assert code == 0
    assert f"compare with [relay] the run at {older}" in out
    assert "!!   0.60  relay.ratio.push_relay_over_ssh" in out  # 0.96 after 1.6
    assert "[agent] no results found" in out
    md = (results / "latest.md").read_text()
    assert f"commit {newer}" in md and "relay_vs_openssh-latest.json" in md


def test_compare_without_an_earlier_run_says_so(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    history.write_latest(tmp_path, "relay_vs_openssh", relay_json(), "")
    assert suite.main(["--report-only", "--compare", "--only", "relay",
                       "--results-dir", str(tmp_path)], repo=None) == 0
    captured = capsys.readouterr()
    assert "compare [relay]: no earlier run of this suite in history.jsonl" in captured.out


def test_dates_of_both_formats_order_together() -> None:
    assert history.parse_date("2026-11-28 20:57 UTC") < \
        history.parse_date("2026-11-28T21:00:00+00:00")
    assert history.parse_date("not a date") < history.parse_date("2000-01-01")


# --- the fast path suite (bench/fast_path.py): report rendering, no transfers -------------

fast_path = pytest.importorskip("bench.fast_path")
fpr = pytest.importorskip("bench.fast_path_report")
fast_workers = pytest.importorskip("bench.fast_workers")


def fast_path_json(ratio: float = 0.72, connect_cpu: float = 0.38) -> dict:
    def series(workload: str, path: str, mb: float, cpu: dict | None = None,
               ratio_: float | None = None) -> dict:
        cpu = cpu or {}
        return {"workload": workload, "path": path,
                "label": fpr.LABELS[workload, path],
                "carrier": fpr.CARRIERS[workload, path], "mb_per_s": stat(mb, mb - 5, mb + 5),
                "ratio_to_direct": None if ratio_ is None else stat(ratio_, ratio_ - 0.05,
                                                                    ratio_ + 0.05),
                "cpu_s_per_gib": {g: stat(v) for g, v in cpu.items()},
                "core_share": {g: stat(v / 3) for g, v in cpu.items()},
                "setup_s": stat(0.3), "setup_cpu_s": {g: stat(0.01) for g in cpu},
                "teardown_cpu_s": {g: stat(0.0) for g in cpu},
                "own_exited_before_stream_end": 0, "samples": [],
                "machine_cores": {"busy_cores": stat(1.9), "kernel_cores": stat(1.2)},
                "machine_cpu_s_per_gib": stat(1.6)}

    goals: list[dict] = []
    fpr._goal(goals, "ssh session via the fast path ÷ direct >= 0.65", ratio, 0.65, True,
                    "×")
    fpr._goal(goals, "ssh stream: labrelay connect CPU-s/GiB <= 0.4", connect_cpu, 0.4,
                    False, "CPU-s/GiB", "moonshot")
    fpr._goal(goals, "raw TCP via the fast path (socket-fed) ÷ direct loopback >= 0.35",
                    None, 0.35, True, "×")
    return {
        "benchmark": "fast_path", "date": "2026-11-28T19:00:00+00:00", "commit": "abc1234",
        "relay_uncommitted_at_start": [],
        "conditions": {"cpu_model": "Test CPU", "nproc": 2, "loadavg_at_start": "0.1 0.1 0.1",
                       "kernel": "6.1", "python": "3.11", "twisted": "26", "cryptography": "50",
                       "labrelay": "0.1", "openssh": "OpenSSH_9.2p1", "bytes": 2**30, "runs": 5,
                       "datapath_env": "(unset: auto)", "datapath_backend": "c (auto)",
                       "backends_logged": {"relay backend: data path: c backend": 1},
                       "ciphers": {"user ssh": "chacha20-poly1305@openssh.com"},
                       "remote_command": fpr.REMOTE_COMMAND,
                       "rusage_wrapper_start_s": 0.08, "seed_variant": "public port",
                       "timing": "t", "cpu_method": "c", "order": "o"},
        "series": [
            series("ssh", "direct", 550.0),
            series("ssh", "fast", 400.0, {"connect": connect_cpu, "relay": 0.44, "agent": 0.24},
                   ratio),
            series("ssh", "seed", 350.0, {"ssh_R": 1.2, "cloud_sshd": 1.1}, 0.64),
            series("ssh", "seed_full", 170.0, {"full_cloud_sshd": 1.1, "full_autossh_R": 1.2,
                                               "full_ssh_L": 1.3, "full_lab_sshd_L": 1.1,
                                               "full_lab_sshd_R": 1.2, "full_gpu_ssh_R": 1.3},
                   0.31),
            series("raw", "direct", 4600.0),
            series("raw", "socat_sock", 2500.0, {"socat": 0.3}, 0.5),
            series("raw", "fast_sock", 1900.0, {"connect": 0.3, "relay": 0.3, "agent": 0.3},
                   0.36),
            series("raw", "seed_full", 400.0, {"full_autossh_R": 0.9}, 0.09),
            series("raw", "socat_pipe", 800.0, {"socat": 0.7}, 0.15),
            series("raw", "fast_pipe", 1100.0, {"connect": 0.36, "relay": 0.16, "agent": 0.2},
                   0.24),
        ],
        "seed_full": {"ssh_ratio_to_fast": stat(0.43, 0.4, 0.5),
                      "raw_ratio_to_fast_sock": stat(0.21, 0.2, 0.25)},
        "goals": goals,
        "machine_cpu_during_measurement": {"wall_s": 90.0, "busy_cpu_s": 150.0,
                                           "bench_processes_cpu_s": 100.0, "steal_cpu_s": 0.0,
                                           "loadavg_at_end": "1.0 1.0 1.0"},
        "anomalies": [],
    }


def test_fast_path_goals_have_signed_margins() -> None:
    g = {x["goal"]: x for x in fast_path_json(ratio=0.60, connect_cpu=0.30)["goals"]}
    ratio = g["ssh session via the fast path ÷ direct >= 0.65"]
    assert ratio["status"] == "MISS" and ratio["margin"] == pytest.approx(-0.05)
    cpu = g["ssh stream: labrelay connect CPU-s/GiB <= 0.4"]
    assert cpu["status"] == "PASS" and cpu["margin"] == pytest.approx(0.10)
    assert cpu["margin_pct"] == pytest.approx(25.0) and cpu["level"] == "moonshot"
    missing = g["raw TCP via the fast path (socket-fed) ÷ direct loopback >= 0.35"]
    assert missing["status"] == "MISS" and missing["margin"] is None


def test_fast_path_own_report() -> None:
    md = fpr.markdown(fast_path_json())
    assert "| ssh via the fast path (ProxyCommand labrelay connect) | 400.0 (395.0–405.0) | " \
           "0.72 (0.67–0.77) | labrelay connect 0.38" in md
    assert "ssh -N -R (lab_pc) 1.20" in md and "cloud sshd session 1.10" in md
    assert "| goal | 0.720 × | +0.070 (+11 %) | **PASS** |" in md
    assert "| moonshot | 0.380 CPU-s/GiB | +0.020 (+5 %) | **PASS** |" in md
    assert "No anomalies" in md and "Test CPU" in md
    # the raw goal is the socket-fed variant; the pipe-fed ones are labelled extras
    assert "| labrelay connect sink:9000 via the fast path, socket-fed (inetd-style; the raw " \
           "goal) | 1900.0 (1895.0–1905.0) | 0.36 (0.31–0.41) |" in md
    assert "| extra: labrelay connect sink:9000 via the fast path (pipe-fed) | 1100.0" in md
    assert "| 1.90 (1.90–1.90) / 1.20 (1.20–1.20); 1.60 (1.60–1.60) CPU-s/GiB |" in md
    assert "socket-fed fast path (labrelay connect as an inetd-style service: " \
           "0.36× (0.31–0.41) direct)" in md
    assert "the pipe-fed extras 0.24× (0.19–0.29) (fast path) and 0.15× (0.10–0.20)" in md
    # the seed's full chain: its own rows, and the goals' text quotes its measured ratios
    assert "| ssh via the seed's full chain (ssh -R, ssh -L detach, autossh -R; public port) " \
           "| 170.0 (165.0–175.0) | 0.31 (0.26–0.36) | cloud sshd session (autossh's) 1.10" in md
    for proc in ("autossh -R (lab_pc → cloud) 1.20", "ssh -N -L (lab_pc detach) 1.30",
                 "lab_pc sshd session of the -L 1.10", "lab_pc sshd session of the -R 1.20",
                 "ssh -N -R (gpu_cluster → lab_pc) 1.30"):
        assert proc in md
    assert "a user's ssh session 0.31× (0.26–0.36) direct (0.43× (0.40–0.50) the fast " \
           "path's), raw 0.09× (0.04–0.14) direct loopback (0.21× (0.20–0.25)" in md
    assert "about 0.30×" in md
    for line in md.splitlines():  # no stray pipes inside table cells
        if line.startswith("| ssh | ") or line.startswith("| raw | "):
            assert line.count("|") == 4, line


def test_fast_path_in_the_combined_report() -> None:
    data = fast_path_json()
    figs = suite.key_figures("fast_path", data)
    assert figs["fast_path.ssh.fast.mb_per_s"]["value"] == 400.0
    assert figs["fast_path.ssh.fast.ratio_to_direct"]["better"] == "higher"
    assert figs["fast_path.ssh.fast.cpu_s_per_gib.connect"]["better"] == "lower"
    assert "fast_path.ssh.direct.ratio_to_direct" not in figs
    assert figs["fast_path.raw.fast_sock.ratio_to_direct"]["value"] == 0.36
    assert figs["fast_path.raw.fast_pipe.ratio_to_direct"]["value"] == 0.24
    assert figs["fast_path.ssh.seed_full.ratio_to_direct"]["value"] == 0.31
    assert figs["fast_path.ssh.seed_full.cpu_s_per_gib.full_ssh_L"]["better"] == "lower"
    assert suite.key_figures("fast_path", {"series": [None, {"path": "x"}]}) == {}
    combined = suite.combine({"fast_path": data}, {"fast_path": "f.json"}, "abc1234",
                             "2026-11-28T19:00:00+00:00")
    md = suite.markdown(combined, [])
    assert "## Fast path" in md
    assert "| ssh | ssh via the fast path (ProxyCommand labrelay connect) | 400.0 (395.0–405.0) " \
           "| 0.72 (0.67–0.77) | connect 0.38, relay 0.44, agent 0.24 |" in md
    assert "**PASS** (margin +0.070)" in md and "data path c (auto)" in md
    worse = suite.compare(suite.combine({"fast_path": fast_path_json(ratio=0.5)}, {}, "c", "d"),
                          combined)
    assert any(r["worse"] and r["figure"] == "fast_path.ssh.fast.ratio_to_direct" for r in worse)


def test_fast_path_accounting_and_rusage_wrapper(tmp_path: Path) -> None:
    acct = fast_workers.Accounting({})
    acct.own("connect", 2**22 + 12345)  # no such process: its /proc reads give None
    acct.start, acct.end = {"connect": 0.25}, {"connect": 0.65}
    phases = acct.finish(own_total=0.72)
    assert phases["setup_cpu"]["connect"] == 0.25
    assert phases["cpu"]["connect"] == pytest.approx(0.40)
    assert phases["teardown_cpu"]["connect"] == pytest.approx(0.07)
    acct.end = {"connect": None}  # gone before the stream's end: all after start is stream
    assert acct.finish(own_total=0.72)["cpu"]["connect"] == pytest.approx(0.47)

    out = tmp_path / "rusage.jsonl"
    import subprocess
    code = subprocess.run([sys.executable, fast_workers.THIS, "--worker", "rusage", str(out), "--",
                           sys.executable, "-c", "raise SystemExit(3)"], timeout=60).returncode
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 3 and lines[0]["pid"] > 0
    assert lines[1]["exit"] == 3 and lines[1]["cpu_s"] > 0


# --- the agent bench's Python peers (bench/agent_vs_openssh.py, bench/peers.py) ------------

agent_bench = pytest.importorskip("bench.agent_report")
peers = pytest.importorskip("bench.peers")


def agent_json(skipped: dict | None = None) -> dict:
    names = ["agent", "ssh", "ssh-same", "asyncssh", "ssh-L", "sshtunnel", "direct"]
    for name in skipped or {}:
        names.remove(name)
    if "sshtunnel" in (skipped or {}):
        names.remove("ssh-L")
    mb = {"agent": 700.0, "ssh": 650.0, "ssh-same": 950.0, "asyncssh": 280.0, "ssh-L": 900.0,
          "sshtunnel": 140.0, "direct": 5000.0}
    p50 = {"agent": 0.8, "ssh": 42.0, "ssh-same": 42.0, "asyncssh": 1.6, "ssh-L": 0.5,
           "sshtunnel": 44.0, "direct": 0.2}

    def tput(name: str) -> dict:
        return {"mb_per_s": stat(mb[name], mb[name] - 10, mb[name] + 10),
                "forwarder_cpu_s_per_gib": stat(3.5 if name == "asyncssh" else 1.0),
                "forwarder_core_share": stat(0.9), "sshd_cpu_s_per_gib": stat(1.0)}

    def lat(name: str) -> dict:
        return {"sessions_per_run": 3, "p50_ms": stat(p50[name]), "p99_ms": stat(p50[name] * 2),
                "max_ms": stat(p50[name] * 3),
                "pooled": {"sessions": 3, "p90_ms": p50[name], "over_20ms": 0},
                "forwarder_cpu_ms_per_session": stat(0.5)}

    ratios = {}
    for num, den in agent_bench.PEER_RATIOS:
        if num in names and den in names:
            ratios[f"push_{num}_over_{den}"] = mb[num] / mb[den]
            ratios[f"setup_p50_back_to_back_{num}_over_{den}"] = p50[num] / p50[den]
    return {
        "benchmark": "agent_vs_openssh", "date": "2026-11-28T21:00:00+00:00",
        "commit": "abc1234", "relay_uncommitted_at_start": [],
        "conditions": {"cpu_model": "Test CPU", "nproc": 2, "loadavg_at_start": "0.1",
                       "kernel": "6.1", "python": "3.11", "twisted": "26", "cryptography": "50",
                       "labrelay": "0.1", "openssh": "OpenSSH_9.2p1", "bytes": 2**30,
                       "runs": 5, "gap_ms": 50.0,
                       "ciphers": {n: "aes128-gcm@openssh.com" for n in names},
                       "peers": {"venv": "/cache/peers",
                                 "versions": {"asyncssh": "2.24.1", "sshtunnel": "0.5.1",
                                              "paramiko": "5.1.0", "cryptography": "50.0.2"},
                                 "skipped": skipped or {},
                                 "local_forwards": [n for n in ("ssh-L", "sshtunnel")
                                                    if n in names]}},
        "paths": {n: {"label": agent_bench.LABELS[n], "cipher": "aes128-gcm@openssh.com"}
                  for n in names},
        "throughput": {"push": {n: tput(n) for n in names}},
        "setup_latency": {"back_to_back": {n: lat(n) for n in names}},
        "ratios": {"push_agent_over_ssh": 700 / 650, **ratios},
        "goals": [], "agent_health": {}, "anomalies": [],
    }


def test_agent_report_has_the_python_peers() -> None:
    md = agent_bench.markdown(agent_json())
    assert "| asyncssh forward_remote_port (-R) | aes128-gcm@openssh.com | 280.0 (270.0–290.0) " \
           "| n/a | 3.50 (3.50–3.50) / n/a |" in md
    assert "| sshtunnel (paramiko), local forward -L | aes128-gcm@openssh.com | 140.0" in md
    assert "| ssh -L (default cipher), local forward |" in md
    assert "asyncssh 2.24.1, sshtunnel 0.5.1 (paramiko 5.1.0)" in md
    assert "sshtunnel has only local forwards" in md
    assert "Python peers, throughput: agent ÷ asyncssh 2.50; agent ÷ sshtunnel 5.00; " \
           "agent ÷ ssh -L 0.78; sshtunnel ÷ ssh -L 0.16." in md
    assert "Python peers, set-up p50: agent ÷ asyncssh 0.50;" in md
    assert "Skipped" not in md


def test_agent_report_names_skipped_peers() -> None:
    reason = "pip install exited 1: ERROR: No matching distribution found for asyncssh"
    md = agent_bench.markdown(agent_json({"asyncssh": reason, "sshtunnel": reason}))
    assert "asyncssh forward_remote_port" not in md and "ssh -L" not in md
    assert f"Skipped: asyncssh ({reason})." in md and f"Skipped: sshtunnel ({reason})." in md
    assert "Python peers, throughput" not in md
    # an older result, before the peers, still renders
    old = agent_json({"asyncssh": reason, "sshtunnel": reason})
    del old["conditions"]["peers"]
    assert "Python peers" not in agent_bench.markdown(old)


def test_agent_peers_in_the_combined_report() -> None:
    data = agent_json({"sshtunnel": "did not start: no ready line"})
    figs = suite.key_figures("agent", data)
    assert figs["agent.throughput.push.asyncssh.mb_per_s"]["value"] == 280.0
    assert figs["agent.ratio.push_agent_over_asyncssh"]["better"] == "higher"
    md = suite.markdown(suite.combine({"agent": data}, {}, "abc1234", "2026-11-28"), [])
    assert "  - Python peers: asyncssh 2.24.1, paramiko 5.1.0, cryptography 50.0.2; " \
           "skipped: sshtunnel (did not start: no ready line)" in md


def test_peers_skipped_when_the_install_fails(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    calls = []

    def fake_run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "ERROR: network is unreachable\n")

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    monkeypatch.delenv(peers.VENV_ENV, raising=False)
    out = peers.ensure_peers(tmp_path / "venv", base_python=sys.executable)
    assert calls[0][1:3] == ["-m", "venv"] and len(calls) == 1
    assert set(out["skipped"]) == {"asyncssh", "sshtunnel"}
    assert "network is unreachable" in out["skipped"]["asyncssh"]
    assert not out["installed"] and out["versions"] == {}


def test_counted_sink_replies_without_a_half_close() -> None:
    import socket
    import struct
    import threading

    from bench import sessions

    listener = socket.create_server((sessions.LOOPBACK, 0))  # TCP: the session sets NODELAY
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    t = threading.Thread(target=sessions._target_session,
                         args=(server, memoryview(b"x" * 16)), daemon=True)
    t.start()
    with client:
        nbytes = 3 * 2**20 + 5
        client.sendall(sessions.MODE_COUNTED + struct.pack(">Q", nbytes))
        sessions.send_count(client, memoryview(b"y" * 65536), nbytes - 9)
        client.settimeout(10)
        assert struct.unpack(">Q", sessions.recv_exact(client, 8))[0] == nbytes  # no shutdown
    t.join(10)


def test_stock_paths_reports_the_native_threads_aes_gcm_and_its_libcrypto() -> None:
    """The stock-paths suite's AEAD line: relay.ssh.aead's cost (cryptography's bundled
    OpenSSL) and, apart, the native -J thread's opening with the libcrypto it loads and
    that library's version (docs/benchmarks.md, round 7: the two differ by 2x here)."""
    from bench.stock_paths_report import aead_cost
    from relay.ssh import gcmrun

    res = aead_cost(sys.executable, packets=64)
    assert "error" not in res, res
    assert res["aes128-gcm@openssh.com"]["open"] > 0
    native = res.get("aes128-gcm, native thread")
    if not gcmrun.native_enabled():
        assert native is None
        return
    assert native is not None and native["open"] > 0
    assert native["libcrypto"].startswith("OpenSSL ")
