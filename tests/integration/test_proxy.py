"""Through an HTTP CONNECT proxy (a real ``tinyproxy``) and ``transport = "auto"``
(issue 17 §3, §5): the agent's link and ``labrelay connect`` over TLS through the
proxy; a proxy that refuses shows its status line; credentials; https_proxy; the
automatic fallback in order, each attempt logged, the route that worked kept for the
next reconnect."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import LOOPBACK, AgentProcess, KeyPair, find_program, free_port
from test_tls import (  # noqa: F401 - fixtures
    TLSRelay,
    _run,
    ca,
    site,
    ssh_config,
    start_tls_agent,
    stock_tools_config,
    tls_keys,
)
from tinyproxy import Tinyproxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy_factory(tmp_path: Path, diagnostics: Callable[[object], object],
                  ) -> Iterator[Callable[..., Tinyproxy]]:
    started: list[Tinyproxy] = []

    def start(connect_ports: list[int], auth: tuple[str, str] | None = None) -> Tinyproxy:
        p = Tinyproxy(tmp_path / f"tinyproxy{len(started)}", free_port(), connect_ports,
                      auth=auth)
        started.append(p)
        diagnostics(p)
        p.wait_listening()
        return p

    yield start
    for p in started:
        p.stop()


def test_link_and_connect_through_the_proxy_over_tls(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], client_key: KeyPair,  # noqa: F811
        proxy_factory: Callable[..., Tinyproxy]) -> None:
    """The proxy allows CONNECT to the TLS port only: the agent's link comes up through
    it, and ssh with ``labrelay connect -o Proxy=...`` lands on gpu_cluster."""
    proxy = proxy_factory([site.tls_port])
    via = ["-o", f"Proxy={proxy.url()}"]
    agent = start_tls_agent(site, start_agent, *site.tls_options(*via))
    connected = agent.wait_for("link_connected", timeout=20)
    assert connected["route"] == f"tls {LOOPBACK}:{site.tls_port} via proxy {proxy.url()}"
    agent.wait_for("forward_ready", timeout=20, since=0, bind="gpu-cluster")
    cfg = ssh_config(site, client_key, " ".join(
        site.connect_argv(*site.tls_options(*via), service="%h:%p")))
    out = _run([find_program("ssh") or "ssh", "-F", str(cfg), "gpu-cluster",
                "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"
    assert "CONNECT" in proxy.log.read_text()


def test_stock_ssh_and_openssl_s_client_through_the_proxy(
        site: TLSRelay, start_agent: Callable[..., AgentProcess], client_key: KeyPair,  # noqa: F811
        proxy_factory: Callable[..., Tinyproxy], tmp_path: Path) -> None:
    """docs/networks.md's hint for stock tools behind a proxy: ``openssl s_client -proxy
    HOST:PORT`` in the ProxyCommand that ``labrelay ssh-config --tls`` prints."""
    from relay.config.schema import ServiceGrant
    from relay.user.sshconfig import render

    proxy = proxy_factory([site.tls_port])
    agent = start_tls_agent(site, start_agent)
    agent.wait_for("forward_ready", timeout=20, bind="gpu-cluster")
    text = render(user="alice", relay_host="relay.test", relay_port=site.relay.port,
                  services=[ServiceGrant("gpu-cluster", 22)],
                  identity=str(site.user_key.path), tls_port=site.tls_port,
                  tls_ca_file=str(site.ca.pem_path), tls_connect=LOOPBACK)
    text = text.replace("openssl s_client", f"openssl s_client -proxy {LOOPBACK}:{proxy.port}")
    site.relay.trust(f"[relay.test]:{site.relay.port} {site.relay.host_key_blob}")
    cfg = stock_tools_config(tmp_path / "ssh_config.proxy", text, site, client_key)
    out = _run([find_program("ssh") or "ssh", "-F", str(cfg), "gpu-cluster",
                "echo $LABRELAY_TEST_HOST"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "gpu_cluster"
    assert "CONNECT" in proxy.log.read_text()


def test_a_refusing_proxy_is_an_error_with_its_status_line(
        site: TLSRelay, proxy_factory: Callable[..., Tinyproxy]) -> None:  # noqa: F811
    """CONNECT to a port the proxy does not allow (the plain SSH port): 403 and its
    reason, as the proxy said it; credentials missing: 407 with a hint; with them, in
    the URL, it works; ``-o Proxy=env`` reads https_proxy."""
    proxy = proxy_factory([site.tls_port])
    out = _run(site.connect_argv("-p", str(site.relay.port), "-o", f"Proxy={proxy.url()}"))
    err = out.stderr.decode()
    assert out.returncode == 1
    assert "the proxy refused the tunnel: HTTP/1.0 403" in err or \
        "the proxy refused the tunnel: HTTP/1.1 403" in err, err

    locked = proxy_factory([site.tls_port], auth=("lab", "s3cret"))
    out = _run(site.connect_argv(*site.tls_options("-o", f"Proxy={locked.url()}")))
    err = out.stderr.decode()
    assert out.returncode == 1 and " 407 " in err and "credentials" in err, err
    good = locked.url(("lab", "s3cret"))
    out = _run(site.connect_argv(*site.tls_options("-o", f"Proxy={good}"), "--no-fast-path",
                                 service="nothing-here"), input=b"")
    assert "cannot reach the relay" not in out.stderr.decode(), out.stderr.decode()
    assert "refused" in out.stderr.decode()  # the relay's own answer: not granted

    # A service not granted: the relay answers at once (gpu-cluster, with no agent here,
    # waited out the relay's public_wait, 10 s per run); its refusal shows it was reached.
    env_run = _run_env(site.connect_argv(*site.tls_options("-o", "Proxy=env"),
                                         service="nothing-here"),
                       {"https_proxy": proxy.url(), "no_proxy": "example.org"})
    assert env_run.returncode == 1
    assert "cannot reach the relay" not in env_run.stderr.decode(), env_run.stderr.decode()
    assert "is not granted" in env_run.stderr.decode(), env_run.stderr.decode()
    assert proxy.log.read_text().count("CONNECT") >= 2
    bypass = _run_env(site.connect_argv(*site.tls_options("-o", "Proxy=env"),
                                        service="nothing-here"),
                      {"https_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.0/8"})
    assert "cannot reach the relay" not in bypass.stderr.decode(), bypass.stderr.decode()
    assert "is not granted" in bypass.stderr.decode(), bypass.stderr.decode()


def _link_status(admin: int) -> dict[str, object]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status.json", timeout=10) as r:
        link: dict[str, object] = json.load(r)["links"][0]
    return link


def test_an_agent_kept_out_by_its_proxy_says_why_in_its_log_and_status(
        site: TLSRelay, start_agent: Callable[..., AgentProcess],  # noqa: F811
        proxy_factory: Callable[..., Tinyproxy]) -> None:
    """The lab PC's agent behind a proxy that refuses the tunnel (403), one that wants
    credentials (407) and one that accepts and never answers: each attempt is a
    ``link_failed`` with the proxy's answer (or its silence and the time waited), and
    ``labrelay status`` shows the link down with that error, not "connecting" with none
    for as long as the proxy keeps it out (operations.md: link_failed is "an attempt
    ended before ready (reason: refused, ...)")."""
    import socket

    refusing = proxy_factory([site.relay.port])  # not the TLS port
    locked = proxy_factory([site.tls_port], auth=("lab", "s3cret"))
    silent = socket.create_server((LOOPBACK, 0))  # the kernel accepts; nobody answers
    try:
        cases = [(refusing.url(), " 403 "), (locked.url(), " 407 Proxy Authentication"),
                 (f"http://{LOOPBACK}:{silent.getsockname()[1]}",
                  "did not open the tunnel to ")]
        for url, says in cases:
            admin = free_port()
            agent = start_tls_agent(site, start_agent, *site.tls_options(
                "-o", f"Proxy={url}", "-o", "ConnectTimeout=2",
                "--admin", f"127.0.0.1:{admin}"))
            failed = agent.wait_for("link_failed", timeout=20)
            assert says in failed["reason"] and url in failed["reason"], failed
            agent.wait_for("link_retry", timeout=20, since=failed["_index"])
            agent.wait_for("admin_listening", timeout=20, since=0)
            link = _link_status(admin)
            assert says in str(link["last_error"]), link
            assert link["state"] in ("down", "connecting") and link["connects"] == 0, link
            agent.stop()
    finally:
        silent.close()


def _run_env(argv: list[str], env: dict[str, str]) -> object:
    import subprocess

    from conftest import REPO_ROOT, child_env

    return subprocess.run(argv, capture_output=True, timeout=60, cwd=REPO_ROOT,
                          env={**os.environ, **child_env(), **env}, stdin=subprocess.DEVNULL)


def test_auto_falls_back_in_order_and_remembers_the_route(
        site: TLSRelay, start_agent: Callable[..., AgentProcess],  # noqa: F811
        targets: object) -> None:
    """``transport = "auto"`` with the plain SSH port closed: the agent tries tcp (logged,
    refused), then tls, which works; when that link is cut, the reconnect starts with
    tls, not with tcp again."""
    from relay_fixtures import Targets

    assert isinstance(targets, Targets)
    cut = targets.proxy((LOOPBACK, site.tls_port))
    closed = free_port()
    admin = free_port()
    options = ["-p", str(closed), "-o", "Transport=auto", "-o", f"TLSPort={cut.port}",
               "-o", "TLSServerName=relay.test", "-o", f"TLSCAFile={site.ca.pem_path}",
               "--admin", f"127.0.0.1:{admin}"]
    known = site.tmp / "known_hosts.auto"
    known.write_text(site.relay.known_hosts.read_text().replace(
        f"[{LOOPBACK}]:{site.relay.port}", f"[{LOOPBACK}]:{closed}"))
    agent = start_tls_agent(site, start_agent, *options, known_hosts=known)
    connected = agent.wait_for("link_connected", timeout=30)
    attempts = [(e["route"], e["n"]) for e in agent.events("link_attempt")]
    assert attempts[:2] == [(f"tcp {LOOPBACK}:{closed}", 1), (f"tls {LOOPBACK}:{cut.port}", 2)]
    assert agent.events("link_route_failed")[0]["route"] == f"tcp {LOOPBACK}:{closed}"
    assert connected["route"] == f"tls {LOOPBACK}:{cut.port}"
    agent.wait_for("link_route_chosen", since=0, route=f"tls {LOOPBACK}:{cut.port}")
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status.json", timeout=10) as r:
        link = json.load(r)["links"][0]
    assert link["route"] == f"tls {LOOPBACK}:{cut.port}" and link["state"] == "connected"
    assert "TLS or a proxy" in link["fast_path"]["reason"], link["fast_path"]
    mark = agent.mark()
    cut.kill_all()
    agent.wait_for("link_lost", timeout=20, since=mark)
    again = agent.wait_for("link_attempt", timeout=30, since=mark)
    assert again["route"] == f"tls {LOOPBACK}:{cut.port}", again
    agent.wait_for("link_connected", timeout=30, since=mark)


def test_auto_moves_on_from_a_port_that_accepts_and_never_speaks_ssh(
        site: TLSRelay, start_agent: Callable[..., AgentProcess]) -> None:  # noqa: F811
    """``transport = "auto"`` where the SSH port accepts TCP and then says nothing (a
    middlebox, a captive portal): that attempt fails at ``connect_timeout`` and the next
    one takes TLS, which is kept (docs/networks.md)."""
    import socket

    silent = socket.create_server((LOOPBACK, 0))  # the kernel accepts; nobody answers
    port = silent.getsockname()[1]
    known = site.tmp / "known_hosts.silent"
    known.write_text(site.relay.known_hosts.read_text().replace(
        f"[{LOOPBACK}]:{site.relay.port}", f"[{LOOPBACK}]:{port}"))
    try:
        agent = start_tls_agent(site, start_agent, "-p", str(port), "-o", "Transport=auto",
                                "-o", f"TLSPort={site.tls_port}", "-o",
                                "TLSServerName=relay.test", "-o",
                                f"TLSCAFile={site.ca.pem_path}", "-o", "ConnectTimeout=2",
                                known_hosts=known)
        connected = agent.wait_for("link_connected", timeout=30)
    finally:
        silent.close()
    assert connected["route"] == f"tls {LOOPBACK}:{site.tls_port}", connected
    failed = agent.events("link_route_failed")
    assert [e["route"] for e in failed] == [f"tcp {LOOPBACK}:{port}"], failed
    assert "no SSH handshake within 2s" in failed[0]["reason"], failed
    assert [e["route"] for e in agent.events("link_attempt")] == [
        f"tcp {LOOPBACK}:{port}", f"tls {LOOPBACK}:{site.tls_port}"]
