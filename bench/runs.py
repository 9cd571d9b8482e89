"""What a report reads of the bench run it summarizes: Protocols, so that a report
never imports its bench (the bench imports its report to summarize itself).  Before
these, each ``*_report`` imported its bench's class under ``TYPE_CHECKING`` and every
bench/report pair was an import circle, if only for mypy.

The benches satisfy them structurally (mypy checks it where a bench hands ``self`` to
its report); read-only properties, so a bench's plain attributes of narrower types fit.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Run(Protocol):
    """Every bench run: its options, the machine at its start, the code it ran."""

    @property
    def args(self) -> argparse.Namespace: ...
    @property
    def anomalies(self) -> list[str]: ...
    @property
    def loadavg_at_start(self) -> str: ...
    @property
    def commit(self) -> str: ...
    @property
    def relay_changes(self) -> list[str]: ...


class PathInfo(Protocol):
    """One forwarding path as a report lists it."""

    @property
    def argv(self) -> list[str]: ...
    @property
    def cipher(self) -> str: ...
    @property
    def port(self) -> int: ...


class RelayPathInfo(PathInfo, Protocol):
    @property
    def echo_port(self) -> int: ...
    @property
    def groups(self) -> Mapping[str, list[int]]: ...


class ArgvOf(Protocol):
    """A process the run started, by its command line."""

    @property
    def argv(self) -> list[str]: ...


class AgentRun(Run, Protocol):
    """``bench.agent_vs_openssh``: the agent against ``ssh -N -R`` and its peers."""

    @property
    def paths(self) -> Mapping[str, PathInfo]: ...
    @property
    def peers(self) -> Mapping[str, Any]: ...


class RelayRun(AgentRun, Protocol):
    """``bench.relay_vs_openssh``: the relay and its agent against ``ssh -R``."""

    @property
    def paths(self) -> Mapping[str, RelayPathInfo]: ...
    @property
    def relay_argv(self) -> list[str]: ...
    @property
    def agent_argv(self) -> list[str]: ...
    @property
    def link_cipher(self) -> str: ...
    def process_pids(self) -> dict[str, int]: ...


class StockRun(Run, Protocol):
    """``bench.stock_paths``: stock ``ssh -J``/``-L`` through the relay."""

    @property
    def relay_argv(self) -> list[str]: ...
    @property
    def agent_argv(self) -> list[str]: ...
    @property
    def ciphers(self) -> Mapping[str, str]: ...
    @property
    def events(self) -> Mapping[str, int]: ...
    def user_ssh(self, variant: str, rusage_out: Path) -> list[str]: ...


class FastRun(StockRun, Protocol):
    """``bench.fast_path``: ``labrelay connect`` against the seed's chain."""

    @property
    def autossh(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def full_ports(self) -> Mapping[str, int]: ...
    @property
    def full_gpu(self) -> ArgvOf: ...
    @property
    def full_detach(self) -> ArgvOf: ...
    @property
    def full_auto(self) -> ArgvOf: ...
    @property
    def ssh_r(self) -> ArgvOf: ...
    @property
    def wrapper_start_s(self) -> float | None: ...
