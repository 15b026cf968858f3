"""Per-token rates and counts of one replica, on a clock the test moves."""

from __future__ import annotations

import pytest
from floxide_server.rates import Buckets, Counts
from floxide_server.store.kv import MemoryKV
from floxide_server.tokens import Tokens
from floxide_server.watch import Watches

from floxide_grpc import InvalidArgument, ResourceExhausted


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_limit_a_bucket_allows_a_seconds_worth_then_its_rate() -> None:
    clock = Clock()
    starts = Buckets(3, clock)
    for _ in range(3):
        starts.take("t", "starts")
    with pytest.raises(ResourceExhausted, match="limit of 3 per second"):
        starts.take("t", "starts")
    starts.take("other", "starts")  # each key its own bucket
    clock.now += 0.34
    starts.take("t", "starts")  # a third of a second (and a little): one more
    with pytest.raises(ResourceExhausted):
        starts.take("t", "starts")


def test_limit_a_rate_under_one_per_second_still_lets_one_through() -> None:
    clock = Clock()
    slow = Buckets(0.5, clock)
    slow.take("t", "starts")
    with pytest.raises(ResourceExhausted):
        slow.take("t", "starts")
    clock.now += 2
    slow.take("t", "starts")


def test_limit_counts_refuse_past_their_most_and_free_on_close() -> None:
    streams = Counts(2)
    streams.open("t", "streams")
    streams.open("t", "streams")
    with pytest.raises(ResourceExhausted, match="has 2 open"):
        streams.open("t", "streams")
    streams.close("t")
    streams.open("t", "streams")
    assert Counts(0).most == 0  # no limit: opens forever
    unlimited = Counts(0)
    for _ in range(1000):
        unlimited.open("t", "streams")


def test_token_a_short_given_admin_token_is_refused() -> None:
    kv = MemoryKV()
    with pytest.raises(InvalidArgument, match="shorter than 32"):
        Tokens(kv, Watches(kv), "admin")
