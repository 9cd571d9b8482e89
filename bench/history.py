"""The results directory: one full result per suite, and a compact history of every run.

Each benchmark overwrites ``<stem>-latest.json`` (every sample, conditions) and
``<stem>-latest.md`` (its report) and appends one line to ``history.jsonl``: the date,
commit, suite, the headline ratios and the goals with their values and PASS/MISS. The full
JSON of a run is 100–250 kB; its history line is about 1–2 kB, so the history can be
committed for every run while only the latest full run is kept.

Runs are ordered by the commit each one recorded (ancestors first, ``git rev-list
--topo-order``), not by file times, which a checkout, copy or rebase resets. When the
repository is not available or a recorded commit is not in it, the order falls back to the
recorded timestamps, with a warning.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.figures import conditions, goals, key_figures

HISTORY = "history.jsonl"
# result file stem -> the suite's name in the combined report and the history
STEMS = {"agent_vs_openssh": "agent", "relay_vs_openssh": "relay", "plain_hop": "plain_hop",
         "fast_path": "fast_path", "stock_paths": "stock_paths"}
T = TypeVar("T")


def latest_name(stem: str) -> str:
    return f"{stem}-latest.json"


def suite_of(stem: str) -> str:
    """The suite a result stem belongs to (``plain_hop-design`` is its own history suite)."""
    return STEMS.get(stem, stem)


def kind_of(suite: str) -> str:
    """Which figure extractor reads a suite's JSON (``plain_hop-design`` is a plain hop)."""
    return "plain_hop" if suite.startswith("plain_hop") else suite


def parse_date(text: Any) -> datetime.datetime:
    """A recorded date as an aware datetime: ISO 8601 (the SSH benches) or
    ``YYYY-MM-DD HH:MM UTC`` (plain_hop); naive means UTC, unreadable sorts first."""
    s = str(text or "").strip()
    for parse in (datetime.datetime.fromisoformat,
                  lambda x: datetime.datetime.strptime(x, "%Y-%m-%d %H:%M UTC")):
        try:
            d = parse(s)
        except ValueError:
            continue
        return d if d.tzinfo else d.replace(tzinfo=datetime.UTC)
    return datetime.datetime.min.replace(tzinfo=datetime.UTC)


def is_headline(name: str) -> bool:
    """The figures a history line keeps: ratios taken within one run (to ssh, to direct),
    which say more across machines and loads than absolute MB/s or ms."""
    return ".ratio." in name or name.endswith(".ratio_to_direct")


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def history_line(suite: str, data: dict[str, Any]) -> dict[str, Any]:
    """One run of one suite, compact: where it ran, its headline ratios and its goals."""
    kind = kind_of(suite)
    cond = conditions(kind, data)
    commit = str(cond.get("commit") or "unknown")
    dirty = bool(data.get("relay_uncommitted_at_start")) or commit.endswith("+changes")
    figs = {name[len(kind) + 1:]: _round(f["value"])
            for name, f in key_figures(kind, data).items() if is_headline(name)}
    line: dict[str, Any] = {"date": str(cond.get("date") or ""), "commit": commit,
                            "suite": suite, "dirty": dirty}
    for k in ("runs", "bytes", "nproc"):
        if cond.get(k) is not None:
            line[k] = cond[k]
    line["figures"] = figs
    line["goals"] = {g["goal"]: [None if g["value"] is None else _round(g["value"]),
                                 g["status"]] for g in goals(kind, data)}
    return line


def line_figures(line: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A history line's figures under their full names, shaped as ``key_figures`` returns."""
    kind = kind_of(str(line.get("suite", "")))
    return {f"{kind}.{k}": {"value": v} for k, v in (line.get("figures") or {}).items()
            if isinstance(v, int | float)}


def read_history(directory: Path) -> list[dict[str, Any]]:
    """The lines of ``directory/history.jsonl`` (none if missing); a bad line is skipped."""
    path = directory / HISTORY
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and "suite" in line and "commit" in line:
            out.append(line)
    return out


def append_history(directory: Path, line: dict[str, Any]) -> Path:
    path = directory / HISTORY
    with path.open("a") as f:
        f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return path


def write_latest(directory: Path, stem: str, res: dict[str, Any], markdown: str) -> Path:
    """Overwrite ``<stem>-latest.json`` and ``<stem>-latest.md`` and append the run to the
    history: what every benchmark does with its result."""
    directory.mkdir(parents=True, exist_ok=True)
    js = directory / latest_name(stem)
    js.write_text(json.dumps(res, indent=2) + "\n")
    (directory / f"{stem}-latest.md").write_text(markdown + f"\nRaw data: `{js.name}`; "
                                                 f"every run's headline: `{HISTORY}`.\n")
    append_history(directory, history_line(suite_of(stem), res))
    return js


def _warn(text: str) -> None:
    print(f"bench: warning: {text}", file=sys.stderr, flush=True)


class CommitOrder:
    """Sorts runs by the commit each recorded: ancestors before descendants, per ``git
    rev-list --topo-order --all`` in ``repo``; runs of one commit by their recorded date.

    Without a repository, or when a recorded commit is not in it, the whole sort uses the
    recorded dates and says so once through ``warn``: mixing the two orders would be
    neither."""

    def __init__(self, repo: Path | None, warn: Callable[[str], None] = _warn) -> None:
        self.repo = repo
        self.warn = warn
        self._topo: dict[str, int] | None = None

    def _git(self, *args: str) -> str | None:
        if self.repo is None:
            return None
        try:
            p = subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout if p.returncode == 0 else None

    def _position(self, commit: str) -> int | None:
        if self._topo is None:
            out = self._git("rev-list", "--topo-order", "--reverse", "--all")
            self._topo = {sha: i for i, sha in enumerate((out or "").split())}
        name = commit.split("+", 1)[0]
        if not name or name in ("unknown", "nogit"):
            return None
        sha = self._git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
        return None if sha is None else self._topo.get(sha.strip())

    def sort(self, items: Iterable[T], key: Callable[[T], tuple[str, Any]]) -> list[T]:
        """``items`` oldest first; ``key(item)`` is its (commit, date)."""
        items = list(items)
        keys = [key(x) for x in items]
        cache: dict[str, int | None] = {}
        for commit, _date in keys:
            if commit not in cache:
                cache[commit] = self._position(commit)
        missing = sorted(c for c, pos in cache.items() if pos is None)
        if missing:
            where = "no git repository" if self.repo is None else \
                f"commit(s) {', '.join(missing)} not in {self.repo}"
            self.warn(f"{where}: ordering runs by their recorded timestamps")
            order = [(0, parse_date(d)) for _c, d in keys]
        else:
            order = [(cache[c] or 0, parse_date(d)) for c, d in keys]
        ranked = sorted(range(len(items)), key=lambda i: order[i])
        return [items[i] for i in ranked]


def latest_result(stem: str, dirs: Sequence[Path],
                  order: CommitOrder) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``<stem>-latest.json`` (by commit order) among ``dirs``, read."""
    found = []
    for d in dict.fromkeys(dirs):
        p = d / latest_name(stem)
        try:
            found.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    if not found:
        return None
    kind = kind_of(suite_of(stem))

    def key(item: tuple[Path, dict[str, Any]]) -> tuple[str, Any]:
        c = conditions(kind, item[1])
        return str(c.get("commit", "")), c.get("date")

    return order.sort(found, key)[-1]


def previous_line(lines: Sequence[dict[str, Any]], current: dict[str, Any],
                  order: CommitOrder) -> dict[str, Any] | None:
    """The history line of ``current``'s suite just before ``current`` in commit order
    (``current``'s own line, same commit and date, is not its predecessor)."""
    ident = (current.get("suite"), current.get("commit"), current.get("date"))
    same = [x for x in lines if x.get("suite") == current.get("suite")
            and (x.get("suite"), x.get("commit"), x.get("date")) != ident]
    ranked = order.sort([*same, current], lambda x: (str(x.get("commit", "")), x.get("date")))
    i = next(i for i, x in enumerate(ranked) if x is current)
    return ranked[i - 1] if i > 0 else None
