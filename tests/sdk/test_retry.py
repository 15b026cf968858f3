"""Retry policies: backoff arithmetic, jitter, error filters, and their proto form."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from floxide_grpc import Backoff, ErrorKind, InvalidDefinition, RetryPolicy
from floxide_grpc._durations import format_seconds
from floxide_grpc._proto.floxide.v1 import workflow_pb2

MS = timedelta(milliseconds=1)


def policy(**kwargs: object) -> RetryPolicy:
    return RetryPolicy(**{"initial_backoff": 100 * MS, "jitter": False, **kwargs})  # type: ignore[arg-type]


def test_backoff_grows_by_strategy_and_is_capped() -> None:
    exponential = policy(backoff=Backoff.EXPONENTIAL, max_backoff=500 * MS)
    assert [exponential.backoff_for(n) / MS for n in (1, 2, 3, 4, 5)] == [100, 200, 400, 500, 500]
    linear = policy(backoff=Backoff.LINEAR, max_backoff=None)
    assert [linear.backoff_for(n) / MS for n in (1, 2, 3)] == [100, 200, 300]
    fixed = policy(backoff=Backoff.FIXED)
    assert [fixed.backoff_for(n) / MS for n in (1, 5)] == [100, 100]


def test_full_jitter_scales_the_capped_wait() -> None:
    jittered = policy(jitter=True, max_backoff=300 * MS)
    assert jittered.backoff_for(3, rand=lambda: 0.5) == 150 * MS
    assert jittered.backoff_for(3, rand=lambda: 0.0) == timedelta(0)


@given(st.integers(1, 200))
def test_jitter_stays_within_zero_and_the_cap(attempt: int) -> None:
    wait = policy(jitter=True, max_backoff=timedelta(seconds=2)).backoff_for(attempt)
    assert timedelta(0) <= wait <= timedelta(seconds=2)


def test_should_retry_counts_attempts_and_filters_kinds() -> None:
    only_timeouts = policy(max_attempts=3, retry_on=frozenset({ErrorKind.TIMEOUT}))
    assert only_timeouts.should_retry(ErrorKind.TIMEOUT, 1)
    assert only_timeouts.should_retry(ErrorKind.TIMEOUT, 2)
    assert not only_timeouts.should_retry(ErrorKind.TIMEOUT, 3)
    assert not only_timeouts.should_retry(ErrorKind.GENERIC, 1)
    everything = policy(max_attempts=2)
    assert everything.should_retry(ErrorKind.WORKER_LOST, 1)
    assert not everything.should_retry(ErrorKind.GENERIC, 1, non_retryable=True)


def test_proto_round_trip() -> None:
    original = RetryPolicy(
        max_attempts=7,
        initial_backoff=250 * MS,
        max_backoff=None,
        backoff=Backoff.LINEAR,
        jitter=True,
        retry_on=frozenset({ErrorKind.WORKER_LOST, ErrorKind.TIMEOUT}),
    )
    message = original.to_proto()
    assert message.strategy == workflow_pb2.BACKOFF_STRATEGY_LINEAR
    assert not message.HasField("max_backoff")
    assert RetryPolicy.from_proto(message) == original


def test_bad_policies_are_refused() -> None:
    with pytest.raises(InvalidDefinition, match="max_attempts must be >= 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(InvalidDefinition, match="unknown error kinds"):
        RetryPolicy(retry_on=frozenset({"OOPS"}))
    with pytest.raises(InvalidDefinition, match="retry policy"):
        RetryPolicy.from_proto(workflow_pb2.RetryPolicy(max_attempts=2))  # no strategy


def test_durations_in_messages_are_the_configured_values() -> None:
    assert format_seconds(0.05) == "0.05s" and format_seconds(0.5) == "0.5s"
    assert format_seconds(2) == "2s" and format_seconds(14 * 86_400) == "1209600s"
    assert format_seconds(1234567.5) == "1234567.5s" and format_seconds(0.000001) == "0.000001s"
