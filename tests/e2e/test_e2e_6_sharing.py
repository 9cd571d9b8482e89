"""Fair share of a congested agent link (issue 15): one user with 1 stream against one
with 8, through lab_pc's link shaped to 40 MB/s, while a third user types.

The lab_pc -> cloud direction of the link is shaped (``tc ... tbf`` on lab_pc's
``wan0``), so the agent's link is the bottleneck, as in a lab whose uplink is shared:
alice downloads from the data service on gpu_cluster with one connection, carol with
eight, each through their own stock ``ssh -L``; over 10 s each user's share of what
crossed the link is measured (with equal weights, and with alice's ``share = 2``), and
eve's echo round trips through the same link meanwhile.  The load is
``sharingload.py``, which ``bench/sharing.py`` runs too.

The bounds are wall-clock rates on a shared 2-core box, so they are as tight as a loaded
box allows and no tighter: the shares within 42-58 % and 58-75 % (measured at load 5-6:
49.8-50.0 % and 64.4-66.7 %; earlier rounds' single runs at load 6-12 went down to
59 % with weights), the echo p99 under 75 ms (measured at load 5-6: 32-46 ms; earlier
rounds up to 58 ms).  The goals (40-60 %, 60-73 %, echo p99 <= 20 ms) are the bench's,
on a quiet box.  What no wall-clock bound here can catch (round 5's direct writes gave
61 % with weights 2:1 on the quiet bench and passed this test) is carried by
tests/unit/test_fairshare_wire.py, which reads the shares from the order of the bytes
on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from nodes import Site
from sharingload import measure, percentile, start_site

Record = Callable[..., dict[str, Any]]
RATE_MBIT = 320  # 40 MB/s


@pytest.mark.parametrize(("alice_share", "bounds"), [
    (1, (0.42, 0.58)),  # the goal: 40-60 %
    (2, (0.58, 0.75)),  # the goal: 60-73 %
], ids=["equal", "alice-share-2"])
def test_one_stream_against_eight_share_the_link_by_user(
    site: Site, record: Record, alice_share: int, bounds: tuple[float, float]
) -> None:
    start_site(site, shares={"alice": alice_share})
    m = measure(site, {"alice": 1, "carol": 8}, mbit=RATE_MBIT, seconds=10.0, echo_user="eve")
    share = m.share("alice")
    p99 = percentile(m.rtts, 0.99) * 1000
    record(f"fair share: 1 stream (share {alice_share}) vs 8 through a 40 MB/s link",
           alice_share=round(share, 3), link_mb_s=round(m.link_mb_s, 1),
           echo_p99_ms=round(p99, 1), echo_samples=len(m.rtts))
    print(f"alice (1 stream, share {alice_share}) {share:.1%}, carol (8) {1 - share:.1%}, "
          f"{m.link_mb_s:.1f} MB/s; echo p50 {percentile(m.rtts, 0.5) * 1000:.1f} ms, "
          f"p99 {p99:.1f} ms over {len(m.rtts)}")
    assert m.link_mb_s > 0.5 * RATE_MBIT / 8  # the link was the bottleneck, and used
    assert bounds[0] <= share <= bounds[1], share
    assert p99 <= 75, p99  # the goal is 20 ms on a quiet box; 32-46 ms measured at load 5-6
