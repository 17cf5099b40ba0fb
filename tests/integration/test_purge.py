"""The leader's purge through the binary: a backlog of expired aliases is
deleted in bounded entries (at most 1,000 rows each), one round, counted in
/metrics and logged once."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from harness import Node, wait_until
from test_metrics import sample

DAY = 86_400
# Each alias is two rows (the alias and its per-target row): 1,400 rows,
# more than one entry of 1,000 can take.
ALIASES = 700
MAX_ROWS = 1000


def test_a_backlog_is_purged_in_bounded_entries(node_factory):
    node = node_factory(start=False, config={"limits": {"keep_expired_days": 0}})
    # Purge rounds every 200 ms instead of ten minutes.
    node.env = lambda: {**Node.env(node), "TEMPALIAS_TEST_PURGE_EVERY_MS": "200"}
    node.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        made = list(pool.map(lambda _: node.create_alias(days=1), range(ALIASES)))
    assert len({a["id"] for a in made}) == ALIASES
    # Rounds ran meanwhile and found nothing due.
    wait_until(lambda: sample(node.metrics(), "tempalias_purge_entries_total") >= 1, 30, "an idle purge round")
    assert sample(node.metrics(), "tempalias_purged_aliases_total") == 0
    assert node.http("GET", f"/v1/aliases/{made[0]['id']}", headers={"Authorization": f"Bearer {made[0]['token']}"}).status == 200

    # Two days on, every alias is past its expiry (and keep_expired_days 0).
    node.set_clock(2 * DAY)
    # The first entry may take every alias and only some per-target rows:
    # the round is over when all rows are gone and it has logged its sum.
    wait_until(
        lambda: sample(node.metrics(), "tempalias_purged_rows_total") >= 2 * ALIASES
        and "purged long-expired aliases" in node.logs(),
        60,
        "the backlog purged",
    )
    text = node.metrics()
    assert sample(text, "tempalias_purged_rows_total") == 2 * ALIASES
    assert sample(text, "tempalias_purged_aliases_total") == ALIASES
    for alias in (made[0], made[-1]):
        r = node.http("GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"})
        assert r.status == 404, (r.status, r.body)

    # One round deleted it all, in two bounded entries: 1,000 rows, then 400.
    rounds = [
        line
        for line in node.logs().splitlines()
        if "purged long-expired aliases" in line
    ]
    assert len(rounds) == 1, rounds
    fields = dict(re.findall(r"(\w+)=(\S+)", rounds[0]))
    assert fields["entries"] == str(-(-2 * ALIASES // MAX_ROWS)), rounds[0]
    assert fields["bounded"] == "true", rounds[0]
    assert fields["aliases"] == str(ALIASES), rounds[0]
    assert fields["rows"] == str(2 * ALIASES), rounds[0]
    assert "purge not committed" not in node.logs()
