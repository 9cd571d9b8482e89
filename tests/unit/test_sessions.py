"""The relay's SessionTable with plain calls and ``now`` values: no reactor, no sockets."""

from __future__ import annotations

from relay.core.sessions import CHANNEL, OTHER, POOLED, SPLICED, SessionTable, State

GPU = "gpu-cluster:22"
WEB = "web:80"


class Counter:
    """A byte meter the test moves by hand."""

    def __init__(self) -> None:
        self.to_service = 0
        self.from_service = 0

    def __call__(self) -> tuple[int, int]:
        return self.to_service, self.from_service


def test_open_counts_against_the_user_and_the_service_at_once() -> None:
    table = SessionTable()
    row = table.open("alice", GPU, "10.0.0.1:5000", 3.0, key=b"k")
    assert row.state is State.OPENING and row.path == CHANNEL
    assert table.active_for_user("alice") == 1
    assert table.totals(GPU).sessions_total == 1 and table.totals(GPU).active == {row}
    assert table.per_user() == {"alice": 1}
    assert table.per_service() == {GPU: {"sessions_total": 1, "sessions_active": 1,
                                         "bytes_to_service": 0, "bytes_from_service": 0}}
    assert row in table and len(table) == 1


def test_close_keeps_totals_and_frees_the_users_place() -> None:
    table = SessionTable()
    meter = Counter()
    row = table.open("alice", GPU, "x:1", 0.0, path=SPLICED)
    assert table.moving(row, meter, agent="lab_pc") is True
    meter.to_service, meter.from_service = 100, 2000
    assert row.counts() == (100, 2000)
    assert table.per_service()[GPU]["bytes_from_service"] == 2000  # live counts included
    assert table.close(row, 9.5, 100, 2000, "bridge closed") is True
    assert table.close(row, 10.0, 1, 1) is False  # once only
    assert row.state is State.ENDED and row.ended == 9.5 and row.why == "bridge closed"
    assert row.counts() == (100, 2000) and row.agent == "lab_pc"
    assert table.active_for_user("alice") == 0
    assert table.per_user() == {"alice": 0}  # a user seen stays, at 0
    assert table.per_service() == {GPU: {"sessions_total": 1, "sessions_active": 0,
                                         "bytes_to_service": 100, "bytes_from_service": 2000}}
    assert table.rows() == [] and list(table.recent) == [row]


def test_aggregates_per_user_and_per_service() -> None:
    table = SessionTable()
    a1 = table.open("alice", GPU, "x:1", 1.0)
    table.open("alice", WEB, "x:2", 2.0)
    b1 = table.open("bob", WEB, "x:3", 0.5)
    table.close(a1, 5.0, 7, 8)
    assert table.per_user() == {"alice": 1, "bob": 1}
    per = table.per_service()
    assert list(per) == [GPU, WEB]
    assert per[GPU]["sessions_total"] == 1 and per[GPU]["sessions_active"] == 0
    assert per[GPU]["bytes_to_service"] == 7
    assert per[WEB]["sessions_total"] == 2 and per[WEB]["sessions_active"] == 2
    assert [r.started for r in table.rows()] == [0.5, 2.0]  # oldest first
    assert table.rows()[0] is b1


def test_a_close_asked_while_opening_stops_it_when_it_would_move() -> None:
    table = SessionTable()
    row = table.open("alice", GPU, "x:1", 0.0, key=b"k")
    table.request_close(row, "the user's key is no longer granted")
    assert table.moving(row, Counter()) is False  # the caller aborts it
    table.close(row, 1.0, 0, 0, "bridge closed")
    assert row.why == "the user's key is no longer granted"  # the first reason is kept


def test_idle_selection_needs_two_looks_a_timeout_apart() -> None:
    table = SessionTable()
    quiet, busy = Counter(), Counter()
    q = table.open("alice", GPU, "x:1", 0.0)
    b = table.open("alice", GPU, "x:2", 0.0)
    waiting = table.open("bob", GPU, "x:3", 0.0)  # never moves: waits for its agent
    table.moving(q, quiet)
    table.moving(b, busy)
    assert table.idle(30.0, 60.0) == []
    busy.to_service += 1
    assert table.idle(60.0, 60.0) == [q]  # no byte either way since 0
    busy.from_service += 1
    assert table.idle(90.0, 60.0) == [q]
    assert set(table.idle(200.0, 60.0)) == {q, b}  # busy's last byte was before 90
    assert waiting not in table.idle(1000.0, 60.0)


def test_a_byte_either_way_resets_the_idle_clock() -> None:
    table = SessionTable()
    meter = Counter()
    row = table.open("alice", GPU, "x:1", 0.0)
    table.moving(row, meter)
    assert table.idle(50.0, 60.0) == []
    meter.from_service = 1
    assert table.idle(59.0, 60.0) == []  # moved: active_at is 59 now
    assert row.active_at == 59.0
    assert table.idle(100.0, 60.0) == []
    assert table.idle(119.0, 60.0) == [row]


def test_selections_for_revocation() -> None:
    table = SessionTable()
    lab, other = object(), object()
    gpu = table.open("alice", GPU, "x:1", 0.0, key=b"alice", agent=lab)
    web = table.open("alice", WEB, "x:2", 1.0, key=b"alice", agent=lab)
    elsewhere = table.open("bob", GPU, "x:3", 2.0, key=b"bob", agent=other)
    public = table.open("public:2201", "public:2201", "x:4", 3.0, agent=lab)
    assert table.of_agent_service(lab, GPU) == [gpu]
    assert table.of_agent_service(lab, "public:2201") == [public]
    assert table.of_keys([b"alice"]) == [gpu, web]
    assert table.of_keys([b"bob", b"nobody"]) == [elsewhere]
    table.close(gpu, 5.0)
    assert table.of_agent_service(lab, GPU) == []


def test_pooled_rows_of_an_agent_are_selected_for_its_link() -> None:
    """The rows an agent's link takes with it: only its own ``pooled`` ones (its channels
    end with the link by themselves; spliced rows are independent of it)."""
    table = SessionTable()
    agent, other = object(), object()
    pooled = table.open("alice", "gpu-cluster:22", "u", 0.0, path=POOLED)
    pooled.agent = agent
    channel = table.open("alice", "web:8080", "u", 0.0)
    channel.agent = agent
    spliced = table.open("alice", "gpu-cluster:22", "u", 0.0, path=SPLICED, agent=agent)
    elsewhere = table.open("bob", "gpu-cluster:22", "u", 0.0, path=POOLED)
    elsewhere.agent = other
    assert table.pooled_of_agent(agent) == [pooled]
    table.close(pooled, 1.0)
    assert table.pooled_of_agent(agent) == []
    assert channel.path != POOLED and spliced.path == SPLICED


def test_totals_keep_a_bounded_number_of_names_then_count_the_rest_as_other() -> None:
    table = SessionTable(max_totals=3)
    rows = [table.open("alice", f"svc:{p}", "o", 0.0) for p in range(6)]
    wild = table.open("alice", "lab:99", "o", 0.0, totals_as="lab:*")
    assert [r.totals_as for r in rows] == ["svc:0", "svc:1", "svc:2", OTHER, OTHER, OTHER]
    assert wild.totals_as == OTHER
    again = table.open("alice", "svc:1", "o", 0.0)  # a name already kept keeps its own
    assert again.totals_as == "svc:1"
    for row in [*rows, wild, again]:
        table.close(row, 1.0, 10, 20)
    totals = table.per_service()
    assert set(totals) == {"svc:0", "svc:1", "svc:2", OTHER}
    assert totals[OTHER]["sessions_total"] == 4 and totals[OTHER]["bytes_to_service"] == 40
    assert totals["svc:1"]["sessions_total"] == 2 and totals[OTHER]["sessions_active"] == 0
