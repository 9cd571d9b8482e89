"""Fixtures of the end-to-end suite: the topology (built once, torn down always), keys,
a ``site`` per test (processes stopped and faults cleared at teardown), and the report.

The suite is collected only when asked for (``scripts/dev test tests/e2e``, or
``LABRELAY_E2E=1``); ``.ci/run`` runs it on its own with ``LABRELAY_E2E_REQUIRED=1``,
which turns "cannot build namespaces here" from a skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO_ROOT / "tests" / "integration")]

from harness import find_program  # noqa: E402
from nodes import Keys, Site, make_keys  # noqa: E402
from report import Report  # noqa: E402
from topology import (  # noqa: E402
    ADDR,
    HOSTS,
    ROUTER,
    Topology,
    TopologyError,
    netns_names,
    unavailable_reason,
)

REQUIRED = os.environ.get("LABRELAY_E2E_REQUIRED", "") == "1"
REPORT = Report()
DIAGNOSTICS = pytest.StashKey[list[Any]]()
_STATE: dict[str, Any] = {"topology": None, "collected": 0, "deselected": 0}


# ---------------------------------------------------------------------------
# collection: only when asked for


def _requested(config: pytest.Config) -> bool:
    if REQUIRED or os.environ.get("LABRELAY_E2E", "") == "1":
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = (Path(config.invocation_params.dir) / path).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and not _requested(config):
        return True
    return None


def pytest_deselected(items: list[pytest.Item]) -> None:
    _STATE["deselected"] += sum(1 for i in items if HERE in Path(str(i.path)).parents)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _requested(terminalreporter.config):
        terminalreporter.write_line(
            "tests/e2e (network namespaces) not collected: run `scripts/dev test tests/e2e` "
            "(.ci/run does)")
    elif _STATE.get("written"):
        terminalreporter.write_line(f"e2e report: {_STATE['written']}")


# ---------------------------------------------------------------------------
# outcomes into the report; process logs into failing tests' reports


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    nodeid = item.nodeid
    if report.when == "call" or report.outcome != "passed":
        if report.when == "teardown" and report.outcome == "failed":
            REPORT.outcomes[nodeid] = "failed (teardown)"
        elif hasattr(report, "wasxfail"):
            REPORT.outcomes[nodeid] = "xfailed" if report.skipped else "xpassed"
            REPORT.skips[nodeid] = f"expected failure (known bug): {report.wasxfail}"
        elif report.when != "teardown":
            REPORT.outcomes[nodeid] = report.outcome
            if report.skipped:
                longrepr = report.longrepr
                reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
                REPORT.skips[nodeid] = reason.removeprefix("Skipped: ")
    if report.failed:
        for obj in item.stash.get(DIAGNOSTICS, []):
            try:
                text = obj.diagnostics()
            except Exception as e:  # diagnostics must never hide the real failure
                text = f"(diagnostics failed: {e!r})"
            report.sections.append((f"{obj.__class__.__name__} {getattr(obj, 'name', '')}",
                                    text[-20000:]))
    return report


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REPORT.outcomes or not REPORT.topology:
        return
    config = session.config
    whole = (not config.option.keyword and not config.option.markexpr
             and not _STATE["deselected"] and not getattr(config.option, "lf", False)
             and all("::" not in a for a in config.args))
    if os.environ.get("LABRELAY_E2E_REPORT"):
        base = Path(os.environ["LABRELAY_E2E_REPORT"])
    elif whole:
        base = REPO_ROOT / "docs" / "e2e-report"
    else:  # a partial run never overwrites the committed report
        base = REPO_ROOT / "bench" / "results" / "e2e-partial"
    REPORT.write(base.with_suffix(".json"), base.with_suffix(".md"))
    _STATE["written"] = f"{base}.json, {base}.md"


@pytest.fixture
def diagnostics(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    registry = request.node.stash.setdefault(DIAGNOSTICS, [])

    def register(obj: Any) -> Any:
        registry.append(obj)
        return obj

    return register


# ---------------------------------------------------------------------------
# the topology


def _unavailable() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    missing = [p for p in ("sshd", "ssh", "scp", "ssh-keygen") if find_program(p) is None]
    if missing:
        return f"OpenSSH not installed ({', '.join(missing)} missing; `scripts/dev setup`)"
    return None


def _reap_stale() -> None:
    """Namespaces of earlier runs whose pytest process is gone (killed hard)."""
    for name in netns_names():
        m = re.fullmatch(r"lr(\d+)-(\w+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            with contextlib.suppress(Exception):
                Topology(prefix=f"lr{m.group(1)}").down()


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    """The seed's hosts, built once; reachability asserted before anything else."""
    reason = _unavailable()
    if reason:
        message = f"e2e: cannot build the network namespaces here: {reason}"
        if REQUIRED:
            pytest.fail(message + " (and LABRELAY_E2E_REQUIRED=1)", pytrace=False)
        pytest.skip(message)
    _reap_stale()
    topo = Topology()
    # A SIGTERM (CI's `timeout`) becomes KeyboardInterrupt, so teardown still runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    _STATE["topology"] = topo
    try:
        topo.up()
        matrix = topo.assert_seed_reachability()
        REPORT.topology = {
            "hosts": [*HOSTS, ROUTER],
            "namespaces": topo.namespaces,
            "addresses": ADDR,
            "reachability": {f"{a}->{b}": ok for (a, b), ok in sorted(matrix.items())},
            "netem_available": topo.netem_available(),
        }
        REPORT.notes[:] = [
            "Keepalives 1 s x 3 on both ends (dead after 4 s of silence, OpenSSH's meaning), "
            "backoff 0.5 -> 2 s, login_grace 3 s, max_unauthenticated 32: short so that "
            "5 trials per fault fit; see docs/e2e.md.",
            "Silently wrong sessions and lost bytes, if any, are counted in the totals "
            "above; the two bugs this suite found (raw TCP cut by a dead link ended with a "
            "FIN; login_grace not covering key exchange) are fixed (docs/e2e.md).",
        ]
        yield topo
    finally:
        if REPORT.topology:
            backend = topo.impairment_backend or (
                "netem" if REPORT.topology["netem_available"] else "wire")
            REPORT.topology["impairment_backend"] = backend
            REPORT.topology["impairment_note"] = (
                "tc netem on the router's lab0 and cloud0" if backend == "netem" else
                "this kernel has no sch_netem: tests/e2e/wire.py, a userspace TUN wire with "
                "netem's semantics, stands in for it")
        stray = topo.down()
        left = topo.leftovers()
        signal.signal(signal.SIGTERM, previous)
        _STATE["topology"] = None
    if stray or any(left.values()):
        raise TopologyError(f"left behind: stray processes {stray}, {left}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def keys(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("e2e-keys"))


@pytest.fixture
def site(topology: Topology, keys: Keys, tmp_path: Path,
         diagnostics: Callable[[Any], Any]) -> Iterator[Site]:
    """A fresh set of processes on the shared topology; the path is clean again after.
    Like the integration fixtures (``start_process``), a test fails at teardown when a
    labrelay process it started logged an unhandled error (a traceback at level
    critical), whatever the scenario did to it."""
    s = Site(topology, keys, tmp_path, diagnostics)
    try:
        yield s
    finally:
        s.close()
        topology.restore()
        topology.link_up()
        topology.clear_impairment()
        topology.stop_wire()
        stray = topology.reap(timeout=5.0)
        if stray:
            raise TopologyError(f"processes left running in the namespaces: {stray}")
    if s.unhandled:
        pytest.fail("a labrelay process logged an unhandled error (a traceback at level "
                    f"critical): {s.unhandled}")


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """``record(scenario, **fields)``: one row of the report for this test."""

    def add(scenario: str, **fields: Any) -> dict[str, Any]:
        return REPORT.add(request.node.nodeid, scenario, **fields)

    return add


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT

