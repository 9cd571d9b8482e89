"""The pooled route's set-up timeline with the relay's native thread in it.

``bench/stamps`` records the relay's and agent's Python socket calls, not those of the
relay's native thread (``lr-gpump``, relay.ssh.nativeforward), which is armed the turn
after the agent's ``K`` and then reads, seals and sends the echo of a pooled session:
from the stamps alone the echo looks like the end of the stream.  This adds the thread's
calls, recorded by ``perf`` on the same clock (CLOCK_MONOTONIC), while a stamped A/B
runs (as root: system-wide, filtered by the thread's name in the kernel)::

    perf record -a -k CLOCK_MONOTONIC -o /tmp/x/perf.data \\
        -e syscalls:sys_enter_sendto --filter 'comm == "lr-gpump"' \\
        -e syscalls:sys_exit_recvfrom --filter 'comm == "lr-gpump"' &
    python bench/setup_ab.py /work/main . --rounds 4 --variants relay_L_e2e \\
        --stamp-dir /tmp/x/st
    kill -INT %1; perf script -i /tmp/x/perf.data -F pid,tid,time,event,trace > /tmp/x/perf.txt
    python bench/setup_thread.py /tmp/x/st/A /tmp/x/perf.txt    # and /tmp/x/st/B

For each pooled, early-confirmed session after an idle gap: when each step happened,
in ms after the relay read her channel open (medians, quartiles).  The echo is the
first 36-byte packet to her after the ``K`` (a one-byte CHANNEL_DATA sealed with
AES-GCM), by Python or by the thread, whichever came first.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_steps import Event, around, first, load, opens_after_idle

ECHO = 36  # a sealed one-byte CHANNEL_DATA: 4 + 16 + 16


def thread_calls(path: str, pid: int) -> list[Event]:
    """The thread's ``sendto`` (fd, length) and completed ``recvfrom`` (bytes) calls in
    process ``pid``, from ``perf script -F pid,tid,time,event,trace``."""
    events: list[Event] = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4 or "/" not in parts[0]:
                continue
            if int(parts[0].split("/")[0]) != pid:
                continue
            t = round(float(parts[1].rstrip(":")) * 1e9)
            if "sys_exit_recvfrom" in line:
                events.append((t, "trecv", 0, int(parts[-1], 16), 0))
            elif "sys_enter_sendto" in line:
                fields = dict(kv.split(": ") for kv in line.split("sendto: ")[1].split(", "))
                events.append((t, "tsend", int(fields["fd"], 16), int(fields["len"], 16), 0))
    return sorted(events)


def main(where: str, perf: str) -> int:
    relay, agent = load(where, "relay"), load(where, "agent")
    (name,) = glob.glob(f"{where}/relay-*.txt")
    thread = thread_calls(perf, int(Path(name).stem.split("-")[1]))
    rows: list[dict[str, int]] = []
    who = {"python": 0, "thread": 0}
    for o in opens_after_idle(relay):
        t0, user = o[0], o[2]
        r, g, th = around(relay, t0), around(agent, t0), around(thread, t0)
        try:
            go = first(r, t0, "send", not_fd=user)
            answer = first(r, go[0], "recv", go[2])
            confirmed = first(r, go[0] - 1, "send", user)
            if answer[3] != 1 or confirmed[0] > answer[0]:
                continue  # the link route, or confirmed only after the answer
            her = first(r, confirmed[0], "recv", user)
            sent_on = first(r, her[0], "send", go[2])
            got = first(g, go[0] - 1, "recv")
            connect = first(g, got[0], "connect")
            k_sent = first(g, connect[0], "send", got[2])
        except LookupError:
            continue
        echoes = []
        for events, op, by in ((r, "send", "python"), (th, "tsend", "thread")):
            try:
                e = first(events, max(answer[0], her[0]) if by == "python" else answer[0],
                          op, fd=user if by == "python" else None)
            except LookupError:
                continue
            if e[3] == ECHO:
                echoes.append((e[0], by))
        if not echoes:
            continue
        echo, by = min(echoes)
        who[by] += 1
        rows.append({"GO sent": go[0], "her confirmation sent": confirmed[0],
                     "agent: GO read": got[0], "agent: connect()": connect[0],
                     "agent: K sent": k_sent[0], "relay: K read": answer[0],
                     "relay: her first bytes read": her[0],
                     "relay: her bytes sent on": sent_on[0], "echo sent to her": echo,
                     "t0": t0})
    if not rows:
        print(f"{where}: no pooled early session lined up")
        return 1
    print(f"{where}: {len(rows)} pooled early sessions (echo by Python {who['python']}, "
          f"by the thread {who['thread']}); ms after the relay read her open")
    for key in rows[0]:
        if key == "t0":
            continue
        values = [(row[key] - row["t0"]) / 1e6 for row in rows]
        q = statistics.quantiles(values, n=4)
        print(f"| {key} | {statistics.median(values):.3f} | {q[0]:.3f}-{q[2]:.3f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("where", help="a stamp directory (relay-*.txt and agent-*.txt)")
    parser.add_argument("perf", help="perf script output with the lr-gpump thread's calls")
    args = parser.parse_args()
    raise SystemExit(main(args.where, args.perf))
