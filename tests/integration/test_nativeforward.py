"""The native open-and-forward thread of a pooled ``ssh -J`` session
(relay.ssh.nativeforward) ending in every way a session ends, mid-bulk: the user's ssh
killed, the user's grant narrowed (the session revoked, her connection kept), the data
connection reset under it, and the relay stopped.  Each time the session ends as it would
on the Python path, and the relay is left with no extra thread and no extra descriptor
(the thread was done with its duplicates of the sockets before it ended).

Real processes, from tests/integration/test_stockpaths.py's site: a ``labrelay relay``,
the labrelay agent's pool through the recording box, a target sshd, stock ``ssh -J``
pushing ``/dev/zero`` into ``cat`` on the target.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import DataStream, MiB, find_program, sha256_hex
from relay_fixtures import wait_until
from test_stockpaths import Site, site  # noqa: F401  (the site fixture)

from relay.ssh.gcmrun import native_enabled

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not native_enabled() and os.environ.get("CI") != "true",
                       reason="no native module or libcrypto here"),
]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _bulk_jump(site: Site) -> subprocess.Popen[bytes]:  # noqa: F811
    """A stock ``ssh -J`` pushing zeros to the target without end, once the native
    thread carries it (its counters move)."""
    assert native_enabled(), "CI builds the native module: the thread must be tested there"
    ssh = find_program("ssh") or "ssh"
    zero = open("/dev/zero", "rb")
    proc = subprocess.Popen([ssh, "-F", str(site.config()), "-J", site.jump, "gpu-cluster",
                             "cat >/dev/null"], stdin=zero, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    zero.close()
    start = site.fast()["native_bytes"]
    wait_until(lambda: site.fast()["native_bytes"] - start > 16 * MiB,
               "the native thread to carry the upload", timeout=60)
    assert [x["path"] for x in site.sessions()] == ["pooled"]
    return proc


def _baseline(site: Site) -> tuple[int, int]:  # noqa: F811
    wait_until(lambda: site.pool()["idle"] > 0, "the agent's pool", timeout=20)
    return _threads(site.relay.pid), _fds(site.relay.pid)


def _back_to(site: Site, threads: int, fds: int) -> None:  # noqa: F811
    pid = site.relay.pid
    wait_until(lambda: not site.sessions(), "the session to end at the relay", timeout=30)
    wait_until(lambda: _threads(pid) <= threads, "the thread to end", timeout=20)
    # the pool is topped up again by the agent: as many descriptors as before, no more
    wait_until(lambda: _fds(pid) <= fds, "no leaked descriptor", timeout=20)


def test_the_user_vanishing_mid_bulk_ends_the_thread(site: Site) -> None:  # noqa: F811
    threads, fds = _baseline(site)
    proc = _bulk_jump(site)
    assert _threads(site.relay.pid) == threads + 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    _back_to(site, threads, fds)
    site.relay.wait_for("session_close", timeout=10, since=0, path="pooled")


def test_a_narrowed_grant_ends_the_session_mid_bulk(site: Site) -> None:  # noqa: F811
    """alice loses gpu-cluster (her key stays, for web:8080): the relay revokes the pooled
    session while the thread carries it; her ssh ends; nothing is left behind."""
    threads, fds = _baseline(site)
    proc = _bulk_jump(site)
    mark = site.relay.mark()
    users = Path(site.relay.dir) / "users"
    users.write_text(f'permitopen="web:8080" {site.alice.public_blob()} alice\n')
    revoked = site.relay.wait_for("relay_session_revoked", timeout=30, since=mark,
                                  user="alice")
    assert (revoked["service"], revoked["path"]) == ("gpu-cluster:22", "pooled"), revoked
    assert proc.wait(timeout=30) != 0
    _back_to(site, threads, fds)


def test_a_reset_data_connection_ends_the_session_mid_bulk(site: Site) -> None:  # noqa: F811
    threads, fds = _baseline(site)
    proc = _bulk_jump(site)
    site.box.cut_data()
    assert proc.wait(timeout=30) != 0  # an error, not a clean end of the stream
    pid = site.relay.pid
    wait_until(lambda: not site.sessions(), "the session to end at the relay", timeout=30)
    wait_until(lambda: _threads(pid) <= threads, "the thread to end", timeout=20)
    # every data connection was reset: the relay holds none of them any more
    wait_until(lambda: _fds(pid) <= fds, "no leaked descriptor", timeout=20)


def test_the_relay_stops_promptly_mid_bulk(site: Site) -> None:  # noqa: F811
    proc = _bulk_jump(site)
    try:
        # SIGTERM, then SIGKILL if it is not gone within the timeout (a hang fails here)
        assert site.relay.proc.stop(timeout=20) == 0
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("site", [{"keepalive_interval": 0.3, "keepalive_count": 50}],
                         indirect=True)
def test_keepalives_mid_bulk_hand_back_and_rearm_byte_exact(site: Site) -> None:  # noqa: F811
    """The relay's keepalives (every 0.3 s of silence here) are Python's packets to the
    user while the thread seals for her: each one takes the stream back first, and the
    thread is armed again on her next data.  16 MiB up three times with pauses (her
    side), then down twice with pauses (the target's), through one session: byte-exact
    both ways, handbacks for a keepalive, the thread carrying both directions."""
    ssh = find_program("ssh") or "ssh"
    stream = DataStream(41, 16 * MiB)
    piece = b"".join(stream.chunks())
    there = site.tmp / "there.bin"
    start = dict(site.fast())
    proc = subprocess.Popen([ssh, "-F", str(site.config()), "-J", site.jump, "gpu-cluster",
                             f"cat > {there} && sleep 1 && cat {there} && sleep 1 && "
                             f"cat {there}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    assert proc.stdin is not None
    for i in range(3):
        proc.stdin.write(piece)
        proc.stdin.flush()
        if i < 2:
            time.sleep(1.0)  # the user's pause: a keepalive goes out while armed
    proc.stdin.close()
    reader.join(120)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else b""
    assert there.stat().st_size == 3 * len(piece)
    assert sha256_hex(there.read_bytes()) == sha256_hex(piece * 3)
    assert len(got) == 1 and len(got[0]) == 6 * len(piece)
    assert sha256_hex(got[0]) == sha256_hex(piece * 6)
    # The session's own audit line (the one session of this relay, so the relay-wide
    # counters moved by its figures alone): what the thread carried of it.
    closed = site.relay.wait_for("session_close", timeout=10, since=0, path="pooled")
    fast = site.fast()
    runs = fast["native_runs"] - start["native_runs"]
    yields = fast["native_yields"] - start["native_yields"]
    if not native_enabled():  # LABRELAY_DATAPATH=python (.ci/run): the same bytes, no thread
        assert runs == yields == 0 and fast["native_sealed"] == start["native_sealed"], fast
        assert not [k for k in closed if k.startswith("native_")], closed
        return
    assert closed["native_opened"] == fast["native_bytes"] - start["native_bytes"], closed
    assert closed["native_sealed"] == fast["native_sealed"] - start["native_sealed"], closed
    assert closed["native_runs"] == closed["native_handbacks"] == runs, (closed, fast)
    assert closed["native_yields"] == yields, (closed, fast)
    assert closed["bytes_to_service"] >= 3 * len(piece), closed  # the inner SSH stream
    assert closed["bytes_from_service"] >= 6 * len(piece), closed
    assert closed["native_opened"] <= closed["bytes_to_service"], closed
    assert closed["native_sealed"] <= closed["bytes_from_service"], closed
    assert "(native thread: " in closed["text"], closed
    # four pauses: at least one keepalive found the thread armed (a congested data
    # connection may have handed it back before some of them), and it was armed again
    assert yields >= 1 and runs >= 2, fast
    assert fast["native_bytes"] - start["native_bytes"] > len(piece), fast
    assert fast["native_sealed"] - start["native_sealed"] > 2 * len(piece), fast


@pytest.mark.parametrize("site", [{"idle_timeout": 2}], indirect=True)
def test_idle_timeout_closes_a_quiet_session_not_one_the_thread_carries(
        site: Site) -> None:  # noqa: F811
    """relay.md: ``idle_timeout``, "seconds without traffic before a session is
    closed".  The sweep reads each session's byte counts; a pooled session's bulk is
    moved by the native thread, not by the relay's Python side, so its counts must
    move too or a busy session would be closed as idle.  With ``idle_timeout = 2``
    (a sweep each second): a quiet ``ssh -J … sleep`` is closed
    (``relay_session_idle``), the bulk upload beside it runs on (round 20's audit:
    the sweep was tested with fake bridges only)."""
    ssh = find_program("ssh") or "ssh"
    proc = _bulk_jump(site)
    mark = site.relay.mark()
    quiet = subprocess.Popen([ssh, "-F", str(site.config()), "-o", "ServerAliveInterval=0",
                              "-J", site.jump, "gpu-cluster", "sleep 60"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        idle = site.relay.wait_for("relay_session_idle", timeout=30, since=mark)
        assert idle["service"] == "gpu-cluster:22", idle
        assert quiet.wait(timeout=30) != 0  # its session was closed under it
        moved = site.fast()["native_bytes"]
        wait_until(lambda: site.fast()["native_bytes"] - moved > 16 * MiB,
                   "the upload to go on", timeout=30)
        before = len(site.relay.events("relay_session_idle", since=mark))
        # three more sweeps past the timeout while the upload moves
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the busy session was closed"
            wait_until(lambda last=moved: site.fast()["native_bytes"] > last, "bytes",
                       timeout=5)
            moved = site.fast()["native_bytes"]
        assert len(site.relay.events("relay_session_idle", since=mark)) == before == 1
        assert [s["path"] for s in site.sessions()] == ["pooled"]
    finally:
        for p in (quiet, proc):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
