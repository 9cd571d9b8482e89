"""The agent's own cap on the sessions its relay opens (relay.core.sessioncap)."""

from __future__ import annotations

from relay.config.schema import LinkConfig
from relay.core.sessioncap import SessionCap, SessionSlot


def test_sessions_over_the_cap_are_refused_and_a_released_place_is_free_again() -> None:
    cap = SessionCap(max_sessions=2, max_connecting=10)
    a, b = cap.admit(), cap.admit()
    assert isinstance(a, SessionSlot) and isinstance(b, SessionSlot)
    assert cap.admit() == "the agent has 2 sessions open on this link (max_sessions = 2)"
    a.connected()
    a.release()
    a.release()  # every path that ends a session may release it: counted once
    assert (cap.open, cap.connecting) == (1, 1)
    assert isinstance(cap.admit(), SessionSlot)
    assert cap.refused == 1


def test_connects_in_flight_have_their_own_cap_per_target() -> None:
    """A target that stopped answering keeps its connects for their timeout: at most
    ``max_connecting`` of them, per forward (a dead host does not hold up the others),
    while connected sessions only count as open."""
    cap = SessionCap(max_sessions=100, max_connecting=2)
    first, second = cap.admit("gpu"), cap.admit("gpu")
    assert isinstance(first, SessionSlot) and isinstance(second, SessionSlot)
    assert cap.admit("gpu") == ("the agent has 2 sessions still connecting to the target "
                                "of gpu (max_connecting = 2)")
    assert isinstance(cap.admit("web"), SessionSlot)  # another target: its own count
    first.connected()
    third = cap.admit("gpu")
    assert isinstance(third, SessionSlot)
    second.release()  # a failed connect leaves both counts
    assert (cap.open, cap.connecting) == (3, 2)
    assert cap.by_forward == {"gpu": 1, "web": 1}


def test_a_reload_changes_the_caps_for_new_sessions_only() -> None:
    cap = SessionCap(max_sessions=3, max_connecting=3)
    slots = [cap.admit() for _ in range(3)]
    cap.reconfigure(1, 1)
    assert isinstance(cap.admit(), str) and cap.open == 3  # the open ones stay
    for s in slots:
        assert isinstance(s, SessionSlot)
        s.release()
    assert isinstance(cap.admit(), SessionSlot)


def test_the_defaults_fit_a_lab() -> None:
    """16 users at the relay's default per-user cap (64) fit one link."""
    assert LinkConfig.max_sessions == 1024 and LinkConfig.max_connecting == 128
    assert SessionCap().max_sessions == LinkConfig.max_sessions


def test_one_target_holds_at_most_max_sessions_per_target_open() -> None:
    """Round 20: the link's whole cap could sit on one lab host (a taken-over relay's
    1 024 connections to one Jupyter).  Each forward's target has its own cap on open
    sessions, counted by the same slots as the link's; the others are not held up."""
    cap = SessionCap(max_sessions=10, max_connecting=10, max_sessions_per_target=3)
    gpu = [cap.admit("gpu") for _ in range(3)]
    assert all(isinstance(s, SessionSlot) for s in gpu)
    for s in gpu:
        assert isinstance(s, SessionSlot)
        s.connected()  # connected sessions still count as open to their target
    assert cap.admit("gpu") == ("the agent has 3 sessions open to the target of gpu "
                                "(max_sessions_per_target = 3)")
    web = cap.admit("web")
    assert isinstance(web, SessionSlot)
    assert cap.status()["sessions_by_target"] == {"gpu": 3, "web": 1}
    gpu[0].release()
    gpu[0].release()
    assert isinstance(cap.admit("gpu"), SessionSlot)
    assert cap.refused == 1 and cap.open == 4
    web.release()  # a target with nothing open is forgotten
    assert cap.status()["sessions_by_target"] == {"gpu": 3}
    cap.reconfigure(10, 10, 4)  # live on reload
    assert isinstance(cap.admit("gpu"), SessionSlot)
    assert isinstance(cap.admit("gpu"), str)


def test_the_per_target_default_leaves_a_host_half_its_descriptors() -> None:
    """512: an honest peak on one GPU node's Jupyter is ~330 sessions (30 lab mates x
    (6 HTTP connections + 5 notebooks' websockets)); a Jupyter server at the soft
    descriptor limit 1 024 keeps half for its own users and kernels."""
    assert LinkConfig.max_sessions_per_target == 512
    assert 30 * (6 + 5) < LinkConfig.max_sessions_per_target <= 1024 // 2
    assert SessionCap().max_sessions_per_target == LinkConfig.max_sessions_per_target


def test_labrelay_status_says_the_caps_and_the_sessions_per_target() -> None:
    """``labrelay status`` (its text, not only status.json) shows each link's sessions,
    its caps and the refusals, and the sessions open per target."""
    from relay.ops.status import format_status

    cap = SessionCap(max_sessions=100, max_connecting=8, max_sessions_per_target=2)
    held = [cap.admit("R:gpu:22"), cap.admit("R:gpu:22"), cap.admit("R:web:8080")]
    assert isinstance(cap.admit("R:gpu:22"), str)
    for slot in held:
        assert isinstance(slot, SessionSlot)
        slot.connected()
    link = {"name": "cloud", "server": "relay.example.org:22", "state": "ready",
            "since": 0.0, "reconnects": 0, "last_error": None, "forwards": [],
            **cap.status()}
    text = format_status({"version": "x", "pid": 1, "links": [link]}, now=0.0)
    assert ("link cloud sessions: 3 open (0 connecting); max_sessions 100, "
            "max_sessions_per_target 2, max_connecting 8; refused over them 1; open per "
            "target: R:gpu:22 2, R:web:8080 1") in text, text
