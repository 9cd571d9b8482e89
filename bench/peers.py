"""The Python peers of ``bench.agent_vs_openssh``: asyncssh and sshtunnel (paramiko).

Two parts:

* ``ensure_peers`` (run by the harness, in the project's venv): a separate venv with
  ``pip install asyncssh sshtunnel``, cached at ``~/.cache/labrelay-bench-peers`` (or
  ``$LABRELAY_BENCH_PEERS``) so reruns are fast; which peers can run, their versions, or
  why one is skipped (no network, a failed install).
* the workers (run by that venv's Python as ``python bench/peers.py asyncssh|sshtunnel
  ...``; standard library plus the peer, nothing from the project):

  - ``asyncssh``: connect to the private sshd with the bench's key and
    ``await conn.forward_remote_port('127.0.0.1', 0, '127.0.0.1', TARGET)``, the same
    reverse forward the agent and ``ssh -N -R`` ask for;
  - ``sshtunnel``: ``SSHTunnelForwarder(remote_bind_address=('127.0.0.1', TARGET))``.
    sshtunnel has only LOCAL forwards (``ssh -L``): its listener is on the client side
    and the sshd opens the connection to the target, so it is compared with
    ``ssh -N -L``, not with the reverse forwards.

  Each prints one JSON ready line (the port to connect to, the negotiated cipher and MAC,
  the versions), then forwards until its stdin reaches EOF (the harness stopping it) or
  it gets SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VENV_ENV = "LABRELAY_BENCH_PEERS"
DEFAULT_VENV = Path.home() / ".cache" / "labrelay-bench-peers"
PACKAGES = ("asyncssh", "sshtunnel")
PEERS = ("asyncssh", "sshtunnel")
VERSIONS_PROBE = """
import json
out = {}
for name in ("asyncssh", "sshtunnel", "paramiko", "cryptography"):
    try:
        out[name] = __import__(name).__version__
    except Exception as e:
        out[name] = None
        out[name + "_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _versions(python: Path) -> dict[str, Any]:
    try:
        p = subprocess.run([str(python), "-c", VERSIONS_PROBE], capture_output=True,
                           text=True, timeout=60)
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {}


def _tail(text: str, n: int = 3) -> str:
    lines = [x for x in text.strip().splitlines() if not x.startswith("WARNING: Location")]
    return " | ".join(lines[-n:])


def ensure_peers(venv: Path | None = None, base_python: str | None = None,
                 timeout: float = 300.0) -> dict[str, Any]:
    """Make the peers' venv if its Python lacks a peer; ``{"python": ..., "venv": ...,
    "versions": {...}, "skipped": {peer: reason}, "installed": bool}``."""
    venv = Path(os.environ.get(VENV_ENV) or venv or DEFAULT_VENV)
    python = venv / "bin" / "python"
    out: dict[str, Any] = {"venv": str(venv), "python": str(python), "installed": False,
                           "skipped": {}}
    versions = _versions(python) if python.exists() else {}
    if not all(versions.get(p) for p in PEERS):
        # the base interpreter, not a venv's (a venv made from a venv works, but this way
        # it does not depend on the project's venv staying where it is)
        base = base_python or str(Path(sys.base_prefix) / "bin" / "python3")
        if not Path(base).exists():
            base = sys.executable
        steps = [[base, "-m", "venv", str(venv)]] if not python.exists() else []
        steps.append([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      *PACKAGES])
        print(f"peers: installing {' '.join(PACKAGES)} into {venv} ...", flush=True)
        for argv in steps:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                   stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                reason = f"{' '.join(argv[:3])} failed: {type(e).__name__}: {e}"
                break
            if p.returncode != 0:
                reason = (f"{' '.join(argv[:4])} exited {p.returncode}: "
                          f"{_tail(p.stdout + p.stderr)}")
                break
        else:
            reason = ""
            out["installed"] = True
        versions = _versions(python) if python.exists() else {}
        for peer in PEERS:
            if not versions.get(peer):
                out["skipped"][peer] = (reason or versions.get(f"{peer}_error")
                                        or f"{peer} did not import in {venv}")
    out["versions"] = {k: v for k, v in versions.items() if not k.endswith("_error")}
    return out


# ---------------------------------------------------------------------------
# the workers (the peers' venv)


def _mac_text(cipher: str, mac: str | None) -> str:
    """The MAC as the other paths show it: ``<implicit>`` for an AEAD cipher."""
    aead = any(marker in str(cipher) for marker in ("gcm", "poly1305"))
    return "<implicit>" if aead or not mac or mac == cipher else str(mac)


def _wait_for_eof_then_exit() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


def asyncssh_worker(port: int, user: str, key: str, known_hosts: str, target: int) -> None:
    import asyncio
    import threading

    import asyncssh

    async def main() -> None:
        conn = await asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key],
                                      known_hosts=known_hosts, agent_path=None, config=[])
        listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", target)
        cipher, mac = conn.get_extra_info("send_cipher"), conn.get_extra_info("send_mac")
        print(json.dumps({
            "port": listener.get_port(),
            "cipher": f"{cipher} + {_mac_text(cipher, mac)}",
            "versions": {"asyncssh": asyncssh.__version__},
        }), flush=True)
        await conn.wait_closed()

    threading.Thread(target=_wait_for_eof_then_exit, daemon=True).start()
    asyncio.run(main())


def sshtunnel_worker(port: int, user: str, key: str, known_hosts: str, target: int) -> None:
    import threading

    import paramiko
    import sshtunnel

    server = sshtunnel.SSHTunnelForwarder(
        ("127.0.0.1", port), ssh_username=user, ssh_pkey=key, allow_agent=False,
        host_pkey_directories=[], ssh_config_file=None,
        remote_bind_address=("127.0.0.1", target), local_bind_address=("127.0.0.1", 0))
    server.start()
    transport = server._transport  # the one paramiko Transport of the tunnel
    print(json.dumps({
        "port": server.local_bind_port,
        "cipher": f"{transport.local_cipher} + "
                  f"{_mac_text(transport.local_cipher, transport.local_mac)}",
        "versions": {"sshtunnel": sshtunnel.__version__, "paramiko": paramiko.__version__},
        "host_key_checked": False,
    }), flush=True)
    threading.Thread(target=_wait_for_eof_then_exit, daemon=True).start()
    threading.Event().wait()


def main(argv: list[str]) -> int:
    """``peers.py asyncssh|sshtunnel SSHD_PORT USER KEY KNOWN_HOSTS TARGET_PORT``."""
    kind, port, user, key, known_hosts, target = argv
    worker = {"asyncssh": asyncssh_worker, "sshtunnel": sshtunnel_worker}[kind]
    worker(int(port), user, key, known_hosts, int(target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
