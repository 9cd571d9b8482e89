"""Per-step medians of new sessions through a public port, from the stamps of
``bench/stamps`` (relay-*.txt and agent-*.txt in one directory)::

    python bench/setup_ab.py /tmp/base . --suite relay --variants relay --stamp-dir /tmp/st
    python bench/setup_steps.py /tmp/st/A; python bench/setup_steps.py /tmp/st/B

Each session is followed from the relay's ``accept`` through its socket calls and the
agent's (same CLOCK_MONOTONIC) to the echo written back to the client: the steps of the
table in docs/benchmarks.md, "Set-up after an idle gap".  Also the reactor wake-ups
and ``epoll_ctl`` calls of each process per session (accept to echo).  Sessions whose
calls do not line up (one overlapping a keepalive, say) are left out and counted.
"""

from __future__ import annotations

import argparse
import glob
import statistics

Event = tuple[int, str, int, int, int]
STEPS = ["relay: accept -> CHANNEL_OPEN sent", "link: -> the agent has read it",
         "agent: -> connect() to the target", "agent: connect() -> confirmation sent",
         "link: -> the relay has read it", "relay: confirmation -> first data sent",
         "link: -> the agent has read it (data)", "agent: -> the byte written to the target",
         "target: its echo -> the agent has read it", "agent: -> the echo sent up the link",
         "link: -> the relay has read it (echo)", "relay: -> the echo written to the client"]


def load(where: str, role: str) -> list[Event]:
    (name,) = glob.glob(f"{where}/{role}-*.txt")
    with open(name) as f:  # (the GC's ``gc`` lines are not socket or reactor steps)
        return [(int(t), op, int(fd), int(n), int(p))
                for t, op, fd, n, p in (line.split() for line in f) if op != "gc"]


def first(events: list[Event], after: int, op: str, fd: int | None = None,
          not_fd: int | None = None) -> Event:
    for e in events:
        if e[0] > after and e[1] == op and (fd is None or e[2] == fd) and (
                not_fd is None or e[2] != not_fd):
            return e
    raise LookupError(op)


SPAN = 40_000_000
"""How long after its start (ns) a session's events are looked for."""


def around(events: list[Event], t0: int) -> list[Event]:
    """The events of the session that started at ``t0``: those in the next ``SPAN``."""
    return [e for e in events if t0 <= e[0] < t0 + SPAN]


def opens_after_idle(relay: list[Event]) -> list[Event]:
    """The relay's reads of a user's channel open (60 to 200 bytes) that are the first
    read of a wake-up after more than 20 ms asleep: the new sessions of a stock suite
    after its idle gap (each its ``t0``; its user's socket is the event's fd)."""
    return [e for i, e in enumerate(relay) if e[1] == "recv" and 60 <= e[3] <= 200 and i > 1
            and relay[i - 1][1] == "wake" and relay[i - 1][0] - relay[i - 2][0] > 20_000_000]


STOCK_STEPS = ["relay: the user's open read -> sent on (GO or CHANNEL_OPEN)",
               "-> the agent has read it", "agent: -> connect() to the target",
               "agent: connect() -> answer sent (K or confirmation)",
               "-> the relay has read it", "relay: -> the user's confirmation sent",
               "user: -> her first bytes read by the relay",
               "relay: -> sent on to the agent", "agent + target: -> the echo read by the relay",
               "relay: -> the echo sent to the user"]


TIMELINE = ["relay: open sent on (GO or CHANNEL_OPEN)", "relay: the user's confirmation sent",
            "agent: the open read", "agent: connect() to the target",
            "agent: answer sent (K or confirmation)", "relay: the answer read",
            "relay: her first bytes read", "relay: her bytes sent on",
            "relay: the echo read", "relay: the echo sent to the user"]


def stock(where: str) -> int:
    """Per-step medians of ``ssh -L`` sessions of the stock suite (``setup_ab.py --suite
    stock``): from the relay's read of the user's channel open (after an idle gap)
    through the agent (the link's CHANNEL_OPEN, or the pooled route's GO and ``K``)
    to the echo written back to the user.  The pooled route's agent splices in C (not
    stamped): its steps after the answer are the relay's."""
    relay, agent = load(where, "relay"), load(where, "agent")
    routes: dict[str, list[list[float]]] = {}
    timelines: dict[str, list[list[float]]] = {}
    busy: dict[str, list[float]] = {}
    opens = opens_after_idle(relay)
    for o in opens:
        t0, user = o[0], o[2]
        r, g = around(relay, t0), around(agent, t0)
        try:
            s1 = first(r, t0, "send", not_fd=user)
            down = s1[2]
            g1 = first(g, s1[0] - 1, "recv")
            c = first(g, g1[0] - 1, "connect")
            r1 = first(r, c[0], "recv", down)
            try:  # the agent's answer (main's pooled route: written later, not by send)
                g2 = first(g, c[0], "send", g1[2])
            except LookupError:
                g2 = (r1[0], "", 0, 0, 0)
            g2 = g2 if g2[0] <= r1[0] else (r1[0], "", 0, 0, 0)
            u1 = first(r, t0, "send", user)  # her confirmation (before or after the GO)
            early = u1[0] < r1[0]  # confirmed before the agent's answer was read
            if not early:
                u1 = first(r, r1[0], "send", user)
            u2 = first(r, u1[0], "recv", user)
            # her bytes sent on: after the answer, or (the pooled route's pipelining)
            # before it, right behind the GO
            s2 = first(r, u2[0], "send", down)
            r2 = first(r, max(s2[0], r1[0]), "recv", down)
            u3 = first(r, r2[0], "send", user)
        except LookupError:
            continue
        route = "pooled (GO, K)" if r1[3] == 1 else "link (CHANNEL_OPEN)"
        if early:
            route += ", early"
        if r2[3] == 0:
            # What Python read next was the end of the stream: the echo was read (and
            # sealed, and sent) by the relay's native thread, which is not stamped, or
            # (rarely) not caught; its last two rows are not the echo's.
            route += ", echo not seen by Python"
        at = [s1[0], u1[0], g1[0], c[0], g2[0], r1[0], u2[0], s2[0], r2[0], u3[0]]
        timelines.setdefault(route, []).append([(t - t0) / 1e6 for t in at])
        if not early:  # the steps follow each other only when the user waits
            ts = [t0, s1[0], g1[0], c[0], g2[0], r1[0], u1[0], u2[0], s2[0], r2[0], u3[0]]
            steps = routes.setdefault(route, [[] for _ in STOCK_STEPS])
            for i in range(len(STOCK_STEPS)):
                steps[i].append((ts[i + 1] - ts[i]) / 1e6)
        for role, evs in (("relay", r), ("agent", g)):
            busy.setdefault(f"{route}: {role} wake-ups (to the echo)", []).append(
                sum(1 for e in evs if e[1] == "wake" and e[0] <= u3[0]))
            busy.setdefault(f"{route}: {role} epoll_ctl (to the echo)", []).append(
                sum(1 for e in evs if e[1] == "ctl" and e[0] <= u3[0]))
            work, woke = 0, None
            for e in evs:
                if e[0] > u3[0]:
                    break
                if e[1] == "wake":
                    woke = e[0]
                elif e[1] == "sleep" and woke is not None:
                    work, woke = work + e[0] - woke, None
            busy.setdefault(f"{route}: {role} busy (wake to sleep, to the echo)",
                            []).append(work / 1e6)
    print(f"{sum(len(t) for t in timelines.values())} of {len(opens)} sessions lined up; "
          f"medians in ms")
    names = sorted(routes)
    if names:
        print("| step | " + " | ".join(f"{n} ({len(routes[n][0])})" for n in names) + " |")
        totals = dict.fromkeys(names, 0.0)
        for i, step in enumerate(STOCK_STEPS):
            cells = []
            for n in names:
                m = statistics.median(routes[n][i])
                totals[n] += m
                cells.append(f"{m:.2f}")
            print(f"| {step} | " + " | ".join(cells) + " |")
        print("| sum of the steps | " + " | ".join(f"{totals[n]:.2f}" for n in names) + " |")
    # Every route, early-confirmed ones too (whose agent and user legs overlap): when
    # each event happened, after the relay read the user's open.
    names = sorted(timelines)
    print("\n| ms after the relay read the open | "
          + " | ".join(f"{n} ({len(timelines[n])})" for n in names) + " |")
    for i, event in enumerate(TIMELINE):
        cells = [f"{statistics.median(t[i] for t in timelines[n]):.2f}" for n in names]
        print(f"| {event} | " + " | ".join(cells) + " |")
    for name, values in sorted(busy.items()):
        unit = " ms" if "busy" in name else ""
        print(f"{name}: median {statistics.median(values):.2f}{unit}, "
              f"mean {statistics.mean(values):.2f}")
    return 0


def main(where: str) -> int:
    relay, agent = load(where, "relay"), load(where, "agent")
    steps: list[list[float]] = [[] for _ in STEPS]
    counts: dict[str, list[int]] = {k: [] for k in ("relay wake", "relay ctl", "agent wake",
                                                    "agent ctl")}
    accepts = [e for e in relay if e[1] == "accept"]
    for a in accepts:
        t0, user = a[0], a[2]
        r, g = around(relay, t0), around(agent, t0)
        try:
            s1 = first(r, t0, "send", not_fd=user)
            link = s1[2]
            g1 = first(g, s1[0] - 1, "recv")
            glink = g1[2]
            c = first(g, g1[0] - 1, "connect")
            g2 = first(g, c[0], "send", glink)
            r1 = first(r, g2[0], "recv", link)
            s2 = first(r, r1[0], "send", link)
            g3 = first(g, s2[0], "recv", glink)
            t1 = first(g, g3[0] - 1, "send", not_fd=glink)
            t2 = first(g, t1[0], "recv", t1[2])
            g4 = first(g, t2[0], "send", glink)
            r2 = first(r, g4[0], "recv", link)
            u = first(r, r2[0], "send", user)
        except LookupError:
            continue
        ts = [t0, s1[0], g1[0], c[0], g2[0], r1[0], s2[0], g3[0], t1[0], t2[0], g4[0],
              r2[0], u[0]]
        for i in range(len(STEPS)):
            steps[i].append((ts[i + 1] - ts[i]) / 1e6)
        counts["relay wake"].append(sum(1 for e in r if e[1] == "wake" and e[0] <= u[0]))
        counts["relay ctl"].append(sum(1 for e in r if e[1] == "ctl" and e[0] <= u[0]))
        counts["agent wake"].append(sum(1 for e in g if e[1] == "wake" and e[0] <= g4[0]))
        counts["agent ctl"].append(sum(1 for e in g if e[1] == "ctl" and e[0] <= g4[0]))
    print(f"{len(steps[0])} of {len(accepts)} sessions lined up; medians in ms")
    total = 0.0
    for name, values in zip(STEPS, steps, strict=True):
        m = statistics.median(values) if values else float("nan")
        total += m
        print(f"| {name} | {m:.2f} |")
    print(f"| sum of the steps | {total:.2f} |")
    for name, values in counts.items():
        if values:
            print(f"{name} per session: median {statistics.median(values):g}, "
                  f"mean {statistics.mean(values):.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", action="store_true",
                        help="the stock suite's ssh -L sessions (setup_ab.py --suite stock)")
    parser.add_argument("where", help="a stamp directory (relay-*.txt and agent-*.txt)")
    args = parser.parse_args()
    raise SystemExit(stock(args.where) if args.stock else main(args.where))
