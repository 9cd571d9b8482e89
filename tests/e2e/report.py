"""The figures the e2e suite writes: ``docs/e2e-report.json`` and ``docs/e2e-report.md``.

Each test adds rows (one per scenario) with ``record(...)``; the conftest marks each
row passed or failed from its test's outcome and writes both files at the end of the
session. Times are in seconds, sizes in bytes, throughput in MiB/s.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    """p50 / max / all trials, rounded to the millisecond."""
    if not values:
        return {"trials": 0}
    return {
        "trials": len(values),
        "p50": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "values": [round(v, 3) for v in values],
    }


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # nodeid -> passed/failed/skipped
    skips: dict[str, str] = field(default_factory=dict)  # nodeid -> reason
    topology: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, test: str, scenario: str, **fields: Any) -> dict[str, Any]:
        row = {"scenario": scenario, "test": test, **fields}
        self.rows.append(row)
        return row

    def finish(self) -> dict[str, Any]:
        for row in self.rows:
            outcome = self.outcomes.get(row["test"], "not run")
            row["passed"] = outcome == "passed" and row.get("ok", True)
            row.setdefault("outcome", outcome)
        totals = {
            "scenarios": len(self.rows),
            "passed": sum(1 for r in self.rows if r["passed"]),
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in self.rows),
            "bytes_received": sum(r.get("bytes_received", 0) for r in self.rows),
            "bytes_lost": sum(r.get("bytes_lost", 0) for r in self.rows),
            "silently_wrong_sessions": sum(r.get("silently_wrong", 0) for r in self.rows),
            "relay_connections_to_unregistered": sum(
                r.get("relay_outbound_connects", 0) for r in self.rows),
        }
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _commit(),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version()},
            "duration_s": round(time.time() - self.started, 1),
            "topology": self.topology,
            "tests": self.outcomes,
            "skipped": self.skips,
            "notes": self.notes,
            "totals": totals,
            "scenarios": self.rows,
        }

    def write(self, json_path: Path, md_path: Path) -> dict[str, Any]:
        data = self.finish()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        md_path.write_text(markdown(data))
        return data


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt_times(s: dict[str, Any] | None) -> str:
    if not s or not s.get("trials"):
        return ""
    return f"{s['p50']:.2f} / {s['max']:.2f} (n={s['trials']})"


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 1048576:.1f}"


def markdown(data: dict[str, Any]) -> str:
    t = data["totals"]
    lines = [
        "# labrelay end-to-end report",
        "",
        f"Generated {data['generated']} at commit `{data['commit']}` by `tests/e2e` "
        f"({data['machine']['cpus']} CPUs, Linux {data['machine']['kernel']}, "
        f"Python {data['machine']['python']}); the suite took {data['duration_s']:.0f} s. "
        "How it is built and what each scenario checks: [e2e.md](e2e.md).",
        "",
        f"**Totals:** {t['passed']}/{t['scenarios']} scenarios passed; "
        f"{t['bytes_sent'] / 1048576:.0f} MiB sent, {t['bytes_received'] / 1048576:.0f} MiB "
        f"received and verified; **{t['bytes_lost']} bytes lost, "
        f"{t['silently_wrong_sessions']} silently wrong sessions, "
        f"{t['relay_connections_to_unregistered']} connections made by the relay to "
        "anything but a registered service**.",
        "",
    ]
    topo = data.get("topology") or {}
    if topo:
        lines += [
            f"Topology: namespaces {', '.join(topo.get('hosts', []))} and a router; "
            f"impairment backend: **{topo.get('impairment_backend', '?')}** "
            f"({topo.get('impairment_note', '')}).",
            "",
        ]
    lines += [
        "| scenario | pass | sent MiB | received MiB | lost B | detection s p50 / max | "
        "recovery s p50 / max | throughput MiB/s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["scenarios"]:
        tp = r.get("throughput_mib_s")
        lines.append(
            f"| {r['scenario']} | {'yes' if r['passed'] else '**no** (' + r['outcome'] + ')'} "
            f"| {_mib(r.get('bytes_sent'))} | {_mib(r.get('bytes_received'))} "
            f"| {r.get('bytes_lost', '')} "
            f"| {_fmt_times(r.get('detection_s'))} | {_fmt_times(r.get('recovery_s'))} "
            f"| {'' if tp is None else f'{tp:.1f}'} | {r.get('notes', '')} |"
        )
    if data["skipped"]:
        lines += ["", "Skipped, or failing as expected (a known bug, marked `xfail`):", ""]
        lines += [f"- `{k}`: {v}" for k, v in data["skipped"].items()]
    if data["notes"]:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in data["notes"]]
    failed = [k for k, v in data["tests"].items() if v not in ("passed", "skipped", "xfailed")]
    if failed:
        lines += ["", "Failed tests:", ""] + [f"- `{k}`" for k in failed]
    return "\n".join(lines) + "\n"
