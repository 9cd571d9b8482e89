"""relay.ops.statusview: the admin answers' long lists cut, their counts exact."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.ops.page import render_page
from relay.ops.statusview import DEFAULT_LIMIT, MAX_LIMIT, BadQuery, bounded, cut, limit_of


def snapshot(registered: int, sessions: int = 0) -> dict[str, Any]:
    services = [{"service": f"tb:{i}", "owner": "lab_pc", "since": 0.0,
                 "sessions_active": 0, "sessions_total": 0} for i in range(1, registered + 1)]
    services.append({"service": "web:8080", "owner": "lab_pc", "since": 0.0,
                     "sessions_active": 0, "sessions_total": 0})
    return {"version": "t", "pid": 1, "started": 0.0, "relay": {
        "listen": "0.0.0.0:2222",
        "agents": [{"name": "lab_pc", "peer": "192.0.2.1:1", "services":
                    [s["service"] for s in services]}],
        "users": [{"name": "alice", "peer": f"192.0.2.9:{i}"} for i in range(sessions)],
        "services": services,
        "service_grants": [{"service": "tb:*", "owner": "lab_pc"},
                           {"service": "web:8080", "owner": "lab_pc"}],
        "sessions": [{"user": "alice", "service": "web:8080", "origin": "x", "path": "channel",
                      "age": 1.0, "bytes_to_service": 0, "bytes_from_service": 0}
                     for _ in range(sessions)],
        "per_service": {s["service"]: {"sessions_active": 0, "sessions_total": 0,
                                       "bytes_to_service": 0, "bytes_from_service": 0}
                        for s in services[:512]},
    }}


def test_the_query_says_the_limit() -> None:
    assert limit_of({}) == DEFAULT_LIMIT
    assert limit_of({b"limit": [b"7"]}) == 7
    assert limit_of({b"all": [b"1"]}) is None
    assert limit_of({b"all": [b"0"], b"limit": [b"0"]}) == 0
    for bad in (b"-1", b"x", str(MAX_LIMIT + 1).encode()):
        with pytest.raises(BadQuery):
            limit_of({b"limit": [bad]})


def test_the_lists_are_cut_and_the_counts_exact() -> None:
    view = bounded(snapshot(5000, sessions=300), 100)["relay"]
    assert len(view["services"]) == 100 and view["services_count"] == 5001
    assert view["services"][0]["service"] == "web:8080"  # explicitly granted first
    assert view["services_summary"] == [
        {"owner": "lab_pc", "name": "tb", "registered": 5000},
        {"owner": "lab_pc", "name": "web", "registered": 1}]
    assert len(view["sessions"]) == 100 and view["sessions_count"] == 300
    assert len(view["users"]) == 100 and view["users_count"] == 300
    assert len(view["per_service"]) == 100 and view["per_service_count"] == 512
    assert view["agents"][0]["services_count"] == 5001
    assert len(view["agents"][0]["services"]) == 100
    assert cut(view, "services") == 4901 and cut(view, "sessions") == 200
    size = len(json.dumps(bounded(snapshot(5000, sessions=300), 100), indent=2))
    assert size < 64 * 1024, size


def test_all_cuts_nothing_but_still_counts() -> None:
    view = bounded(snapshot(300), None)["relay"]
    assert len(view["services"]) == 301 and view["services_count"] == 301
    assert view["limit"] is None and cut(view, "services") == 0


def test_a_node_without_a_relay_is_unchanged() -> None:
    plain = {"version": "t", "links": []}
    assert bounded(plain, 10) is plain


def test_the_page_says_what_it_left_out_and_calls_nothing_down_it_did_not_see() -> None:
    data = snapshot(500)
    data["relay"]["service_grants"].append({"service": "db:5432", "owner": "lab_pc"})
    page = render_page(bounded(data, 10), now=1.0)
    assert "491 more of 501 registrations not shown" in page
    assert "lab_pc tb: 500" in page and 'href="?all=1"' in page
    # the granted ones come first, so db:5432 is known to be down
    assert '<td>db:5432</td><td><span class="down">down</span>' in page
    explicit = snapshot(0)
    explicit["relay"]["service_grants"] += [{"service": f"s{i}:1", "owner": "lab_pc"}
                                            for i in range(20)]
    explicit["relay"]["services"] += [{"service": f"s{i}:1", "owner": "lab_pc", "since": 0.0}
                                      for i in range(0, 20, 2)]
    page = render_page(bounded(explicit, 5), now=1.0)  # granted ones past the cut
    assert '<td>s1:1</td><td><span class="muted">not shown</span>' in page
    whole = render_page(bounded(explicit, None), now=1.0)
    assert "not shown" not in whole and '<td>s1:1</td><td><span class="down">' in whole
