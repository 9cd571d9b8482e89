"""The topology is the seed's (issue 5 §1), asserted before any scenario runs.

The ``topology`` fixture already refused to hand out a topology whose reachability is
wrong; this test records the matrix and checks the parts a connect test cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from topology import ADDR, HOSTS, REACHABLE, ROUTER, Topology


def test_reachability_is_the_seeds(topology: Topology,
                                   record: Callable[..., dict[str, Any]]) -> None:
    """gpu_cluster <-> lab_pc only; lab_pc -> cloud; mac -> cloud; mac reaches neither
    lab_pc nor gpu_cluster; gpu_cluster does not reach cloud (a TCP connect from every
    host to every other host, each bounded by 1 s)."""
    matrix = topology.reachability()
    assert {k for k, ok in matrix.items() if ok} == REACHABLE, matrix
    assert len(matrix) == len(HOSTS) * (len(HOSTS) - 1)
    # Only the router forwards; gpu_cluster has no way out at all.
    assert topology.sysctl("lab_pc", "net.ipv4.ip_forward") == "0"
    assert topology.sysctl(ROUTER, "net.ipv4.ip_forward") == "1"
    assert "default" not in topology.sh("gpu_cluster", "ip", "route").stdout
    # Nothing of it in the root namespace: none of its addresses is local here.
    root = topology_addresses_in_root()
    assert not root & set(ADDR.values()), root & set(ADDR.values())
    record("topology: reachability is the seed's", ok=True,
           notes="; ".join(f"{a}->{b}: {'yes' if ok else 'no'}"
                           for (a, b), ok in sorted(matrix.items())))


def topology_addresses_in_root() -> set[str]:
    import subprocess

    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    return {line.split()[3].split("/")[0] for line in out.stdout.splitlines()}
