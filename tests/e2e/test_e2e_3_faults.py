"""Faults on the real path, with the agent and the relay configured as a user would
(keepalives on; 1 s x 3 here so that five trials of each fault fit the time budget;
session resumption off, see ``Lab``):

* lab_pc's uplink taken down mid-transfer, then up again;
* a silent blackhole between lab_pc and cloud (iptables DROP both ways: no RST);
* the relay SIGKILLed and restarted;
* the agent SIGSTOPped, a new agent started, the old one SIGCONTed.

Detection and recovery times are measured from the moment the fault was injected (or
lifted) to the processes' own events, over ``TRIALS`` trials each, and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from faults import CAROL_PORT, RAW_KINDS, InFlight, Outcome, summarize
from harness import AgentProcess, recv_exactly
from nodes import BACKOFF, CLOUD, DATA_PORT, DATA_PUBLIC_PORT, KEEPALIVE, NsRelay, Site
from report import summary

Record = Callable[..., dict[str, Any]]
TRIALS = 5
SERVICES = ("gpu-cluster:22", "data:9000", "public:2201", "public:2202")
JITTER = 0.2  # labrelay's default backoff jitter
DEAD_AFTER = KEEPALIVE[0] * (KEEPALIVE[1] + 1)  # OpenSSH semantics: interval x (count + 1)
SLACK = 0.5  # event delivery and timer granularity


class Lab:
    """gpu_cluster's sshd and data service, the relay, lab_pc's agent and carol's
    ``ssh -L`` to the data service, all up."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.gpu = site.start_gpu()
        # Resumption off (resume_grace = 0): these scenarios measure detection and
        # recovery, and that sessions crossing the cut end with an error, not short.
        # Sessions that survive a cut are test_e2e_6_resume.py's.
        self.relay = site.start_relay(extra="resume_grace = 0\n")
        self.agent = site.start_agent()
        site.wait_agent_ready(self.agent)
        self.wait_registered(0)
        self.carol = site.local_forward("carol", f"data:{DATA_PORT}", CAROL_PORT)

    def wait_registered(self, since: int, timeout: float = 20.0,
                        relay: NsRelay | None = None) -> dict[str, float]:
        relay = relay or self.relay
        return {s: relay.wait_for("relay_service_registered", timeout=timeout, since=since,
                                  service=s)["time"] for s in SERVICES}

    def works(self) -> None:
        """A login by name and an echo through public port 2202, both right now."""
        self.site.assert_marker("alice", "gpu-cluster")
        with self.site.mac_socket(DATA_PUBLIC_PORT, host=CLOUD, timeout=10) as sock:
            sock.sendall(b"Eping")
            assert recv_exactly(sock, 4) == b"ping"


def next_attempt(agent: AgentProcess, since: int, at: float, slack: float = 0.0) -> float:
    """When the agent first tried to connect at or after ``at`` (``link_connecting``), or
    ``at`` for an attempt logged at most ``slack`` seconds before it; its backoff decides
    this, and it must be no later than one longest backoff after ``at``.  ``slack``: a
    restarted relay answers an attempt as soon as it has bound its port, a moment before
    it logs ``relay_listening``, and the agent logs an attempt just before its SYN leaves
    (seen in CI: an attempt logged 0.8 ms before ``relay_listening`` connected)."""
    tries = [e["time"] for e in agent.events("link_connecting", since=since)
             if e["time"] >= at - slack]
    assert tries, f"no connection attempt after {at}"
    assert tries[0] - at <= BACKOFF[1] * (1 + JITTER) + 0.2, (tries[0] - at)
    return max(float(tries[0]), at)


def check_outcomes(outcomes: list[Outcome], where: str) -> None:
    wrong = [o for o in outcomes if o.silently_wrong]
    assert not wrong, f"{where}: sessions ended silently short: {wrong}"


# ---------------------------------------------------------------------------


def test_link_down_mid_transfer_then_up(site: Site, record: Record) -> None:
    """``ip link set wan0 down`` on lab_pc with an ssh session and a 1 GiB scp in
    flight: both ends declare the link dead within keepalive x (count + 1); both
    sessions end with an error, none silently short; ``up`` again: the forwards are
    usable within 1 s of the agent's next (backoff) attempt."""
    lab = Lab(site)
    topo = site.topo
    detect_agent, detect_relay, recovery, first_session = [], [], [], []
    outcomes: list[Outcome] = []
    for trial in range(TRIALS):
        flight = InFlight(site, trial).start()
        a_mark, r_mark = lab.agent.mark(), lab.relay.mark()
        t0 = time.time()
        topo.link_down()
        dead = lab.agent.wait_for("link_dead", timeout=DEAD_AFTER + 10, since=a_mark)
        peer = lab.relay.wait_for("relay_peer_dead", timeout=DEAD_AFTER + 10, since=r_mark,
                                  kind="agent", name="lab_pc")
        detect_agent.append(dead["time"] - t0)
        detect_relay.append(peer["time"] - t0)
        outcomes += flight.finish()
        r_mark = lab.relay.mark()
        t1 = time.time()
        topo.link_up()
        registered = lab.wait_registered(r_mark)
        took = max(registered.values()) - t1
        recovery.append(took)
        due = next_attempt(lab.agent, a_mark, t1)
        assert max(registered.values()) <= due + 1.0, (
            f"trial {trial}: forwards back {took:.2f}s after the link, "
            f"{max(registered.values()) - due:.2f}s after the agent's attempt was due")
        lab.works()
        first_session.append(time.time() - t1)
    limit = DEAD_AFTER + SLACK
    assert max(detect_agent) <= limit, detect_agent
    assert max(detect_relay) <= limit, detect_relay
    assert max(recovery) <= 1.0 + BACKOFF[1] * (1 + JITTER), recovery
    s = summarize(outcomes)
    record("fault: link down mid-transfer, then up (agent side)",
           detection_s=summary(detect_agent), recovery_s=summary(recovery),
           sessions=s["sessions"], silently_wrong=s["silently_wrong"],
           bytes_received=s["bytes_received"], bytes_lost=s["bytes_lost"],
           notes=f"in flight per trial: an ssh session and a 1 GiB scp (by name); "
                 f"{s['ended_with_error']} ended with an error, {s['completed']} completed; "
                 f"detection limit {DEAD_AFTER:g} s; recovery = all {len(SERVICES)} services "
                 f"registered again; first session {summary(first_session).get('p50')} s p50")
    record("fault: link down mid-transfer (relay side)", detection_s=summary(detect_relay),
           ok=True)
    check_outcomes(outcomes, "link down")


def test_silent_blackhole_detected_on_both_ends(site: Site, record: Record) -> None:
    """iptables DROP on the router, both directions (no RST, no ICMP): the agent logs
    ``link_dead`` and the relay ``relay_peer_dead`` within keepalive x (count + 1); an
    ssh session and an scp in flight end with an error; lifted, the forwards come back."""
    lab = Lab(site)
    topo = site.topo
    detect_agent, detect_relay, recovery = [], [], []
    outcomes: list[Outcome] = []
    for trial in range(TRIALS):
        flight = InFlight(site, 100 + trial).start()
        a_mark, r_mark = lab.agent.mark(), lab.relay.mark()
        dropped = topo.blackhole_drops()
        t0 = time.time()
        topo.blackhole()
        dead = lab.agent.wait_for("link_dead", timeout=DEAD_AFTER + 10, since=a_mark)
        peer = lab.relay.wait_for("relay_peer_dead", timeout=DEAD_AFTER + 10, since=r_mark,
                                  kind="agent", name="lab_pc")
        detect_agent.append(dead["time"] - t0)
        detect_relay.append(peer["time"] - t0)
        outcomes += flight.finish()
        assert topo.blackhole_drops() > dropped  # it was silence, not a reset
        r_mark = lab.relay.mark()
        t1 = time.time()
        topo.restore()
        registered = lab.wait_registered(r_mark, timeout=30)
        recovery.append(max(registered.values()) - t1)
        lab.works()
    limit = DEAD_AFTER + SLACK
    assert max(detect_agent) <= limit, detect_agent
    assert max(detect_relay) <= limit, detect_relay
    # An attempt made during the blackhole hangs until ConnectTimeout (3 s).
    assert max(recovery) <= 3.0 + 1.0 + BACKOFF[1] * (1 + JITTER), recovery
    s = summarize(outcomes)
    record("fault: silent blackhole (agent side: link_dead)", detection_s=summary(detect_agent),
           recovery_s=summary(recovery), sessions=s["sessions"],
           silently_wrong=s["silently_wrong"], bytes_received=s["bytes_received"],
           bytes_lost=s["bytes_lost"],
           notes=f"iptables DROP both ways in the router; {s['ended_with_error']} in-flight "
                 f"sessions ended with an error; limit {DEAD_AFTER:g} s")
    record("fault: silent blackhole (relay side: relay_peer_dead)",
           detection_s=summary(detect_relay), ok=True)
    check_outcomes(outcomes, "blackhole")


def test_relay_killed_and_restarted(site: Site, record: Record) -> None:
    """SIGKILL the relay; start it again (same config, state and port): the agent
    notices at once, re-registers every service within 1 s of its next attempt, no
    name is registered twice, and its fast-path pool is granted again."""
    lab = Lab(site)
    detect, recovery = [], []
    for trial in range(TRIALS):
        a_mark = lab.agent.mark()
        t0 = time.time()
        lab.relay.proc.kill()
        lost = lab.agent.wait_for("link_lost", timeout=10, since=a_mark)
        detect.append(lost["time"] - t0)
        t1 = time.time()
        relay = site.restart_relay()
        lab.relay = relay
        registered = lab.wait_registered(0, relay=relay)
        recovery.append(max(registered.values()) - t1)
        due = next_attempt(lab.agent, a_mark, relay.wait_for("relay_listening", since=0)["time"],
                           slack=0.05)
        assert max(registered.values()) <= due + 1.0, (trial, registered, due)
        regs = relay.events("relay_service_registered")
        assert sorted(e["service"] for e in regs) == sorted(SERVICES), (trial, regs)
        services = relay.status()["relay"]["services"]
        names = [s["service"] if isinstance(s, dict) else s for s in services]
        assert len(names) == len(set(names)), services
        assert relay.events("relay_request_refused") == []
        lab.agent.wait_for("fast_path_ready", timeout=10, since=a_mark)  # the pool is back
        lab.works()
    assert max(detect) <= 1.0, detect
    record("fault: relay SIGKILLed and restarted", detection_s=summary(detect),
           recovery_s=summary(recovery), sessions=TRIALS * 2, silently_wrong=0,
           notes="every service re-registered exactly once per restart; recovery counts "
                 "from the restart command (includes the relay's own start-up)")


def test_agent_stopped_new_agent_takes_over_no_flapping(site: Site, record: Record) -> None:
    """SIGSTOP the agent and start a new one with the same key: it takes every name and
    public port over (the relay probes the frozen holder for 0.5 s) within 1 s of its
    link coming up, plus one backoff retry for a forward refused on the way; SIGCONT
    the old one: it finds its session closed and is refused while the new one answers;
    nothing flaps."""
    lab = Lab(site)
    takeover, serving, refused_on_the_way = [], [], []
    current = lab.agent
    for trial in range(TRIALS):
        current.sigstop()
        r_mark = lab.relay.mark()
        t0 = time.time()
        new = site.start_agent(name=f"agent-{trial + 1}")
        connected = new.wait_for("link_connected", timeout=20)
        taken = lab.wait_registered(r_mark, timeout=15)
        took = max(taken.values()) - connected["time"]
        takeover.append(took)
        assert took <= 1.0 + BACKOFF[0] * (1 + JITTER) + 0.5, (trial, taken)
        regs = lab.relay.events("relay_service_registered", since=r_mark)
        assert all(e["peer"] == regs[0]["peer"] for e in regs), regs  # all to the new one
        assert any(e["takeover"] for e in regs), regs
        refused_on_the_way.append(len(lab.relay.events("relay_request_refused", since=r_mark)))
        lab.works()
        serving.append(time.time() - t0)
        # The old one wakes up: it must not take anything back.
        o_mark = current.mark()
        refused_mark = lab.relay.mark()
        current.sigcont()
        current.wait_for("link_lost", timeout=10, since=o_mark)
        current.wait_for("link_connected", timeout=15, since=o_mark)
        for _ in range(2):  # two retry rounds of being refused
            current.wait_for("forward_refused", timeout=15, bind="gpu-cluster")
        assert lab.relay.events("relay_service_registered", since=refused_mark) == []
        new.assert_no_event("link_lost")
        current.assert_no_event("forward_ready", since=o_mark)
        lab.works()
        current.stop()
        current = new
    record("fault: agent SIGSTOPped, new agent takes over, old SIGCONTed",
           recovery_s=summary(takeover), sessions=TRIALS * 2, silently_wrong=0,
           notes="recovery = every service held by the new agent, after its link was up; "
                 "no flapping: the resumed agent is refused and registers nothing; "
                 f"new agent serving {summary(serving).get('p50')} s p50 after its start; "
                 f"forwards of the new agent refused on the way (then retried): "
                 f"{refused_on_the_way} per trial")


def test_raw_tcp_sessions_cut_by_a_dead_link_end_with_an_error(site: Site,
                                                               record: Record) -> None:
    """Raw TCP sessions cut by the link going down must end with an error at the TCP
    endpoints labrelay holds: the data service's connection from the agent (uploads)
    and mac's connection to the relay's public port 2202 (downloads). A clean FIN
    there tells the peer "that was everything" when it was not.

    Through a stock ``ssh -L`` (carol's) the client's end belongs to OpenSSH, which
    closes with a FIN whatever the reason: SSH has no way to say "aborted". Those are
    reported, not judged (only the upload's far end, the agent's, is)."""
    lab = Lab(site)
    outcomes: list[Outcome] = []
    for trial in range(2):
        flight = InFlight(site, 200 + trial, kinds=RAW_KINDS).start()
        a_mark = lab.agent.mark()
        r_mark = lab.relay.mark()
        site.topo.link_down()
        lab.agent.wait_for("link_dead", timeout=DEAD_AFTER + 10, since=a_mark)
        outcomes += flight.finish()
        site.topo.link_up()
        lab.wait_registered(r_mark)
    judged = [o for o in outcomes if o.kind != "download-L"]
    silent = [o for o in judged if o.silently_wrong]
    s = summarize(judged)
    record("fault: raw TCP sessions cut by a dead link (labrelay's own TCP ends)",
           sessions=len(judged), silently_wrong=len(silent), bytes_received=s["bytes_received"],
           bytes_lost=s["bytes_lost"],
           notes="; ".join(f"{o.kind}: {o.ended} ({o.detail})" for o in outcomes[:4])
           + f"; {len(silent)}/{len(judged)} ended with a clean FIN though cut short")
    assert not silent, silent
