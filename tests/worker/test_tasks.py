"""One queue message may carry many job ids (a batch submit): it is settled once, when all are."""

from __future__ import annotations

import threading

import pytest
from kombu.common import QoS

from worker.tasks import SharedSettle, _arguments, give_back_prefetch, hold_prefetch


def _job_ids(message: object, body: object) -> list[str]:
    """The job ids `_arguments` reads from a message."""
    return _arguments(message, body)[0]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def settle(self, *, count: int) -> SharedSettle:
        return SharedSettle(
            count,
            ack=lambda: self.calls.append("ack"),
            requeue=lambda: self.calls.append("requeue"),
        )


def test_shared_settle_acks_once_after_the_last_id() -> None:
    rec = Recorder()
    settle = rec.settle(count=3)
    settle.ack()
    settle.ack()
    assert rec.calls == []
    settle.ack()
    assert rec.calls == ["ack"]


@pytest.mark.parametrize("failed_at", [0, 1, 2])
def test_shared_settle_requeues_when_any_id_was_not_stored(failed_at: int) -> None:
    rec = Recorder()
    settle = rec.settle(count=3)
    for i in range(3):
        settle.requeue() if i == failed_at else settle.ack()
    assert rec.calls == ["requeue"]


def test_shared_settle_settles_once_from_many_threads() -> None:
    rec = Recorder()
    settle = rec.settle(count=200)
    threads = [
        threading.Thread(target=lambda: [settle.ack() for _ in range(20)]) for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.calls == ["ack"]


def test_job_ids_read_every_argument_of_either_protocol() -> None:
    assert _job_ids(None, [["a", "b"], {}, {}]) == ["a", "b"]  # protocol 2 body
    assert _job_ids(None, {"args": ["a"]}) == ["a"]  # protocol 1 body
    assert _job_ids(None, [[], {}, {}]) == []


class Undecodable:
    """A kombu message whose body does not decode."""

    def decode(self) -> object:
        raise ValueError("not JSON")


@pytest.mark.parametrize(
    "body",
    [
        None,  # protocol 2 body `null`: decoded from the message, which says None again
        5,
        [5, {}, {}],  # arguments that are a number
        [None, {}, {}],
        ["abc", {}, {}],  # a string is not a list of ids (its letters are not ids)
        [],
        {"args": 5},
        {"task": "segsvc.run_job"},
        "text",
    ],
)
def test_job_ids_of_a_malformed_message_are_none(body: object) -> None:
    class Message:
        def decode(self) -> object:
            return body

    assert _job_ids(Message(), body) == []


def test_job_ids_of_an_undecodable_message_are_none() -> None:
    assert _job_ids(Undecodable(), None) == []


def test_arguments_say_whether_the_reconciler_sent_a_suspect() -> None:
    assert _arguments(None, [["a"], {"suspect": True}, {}]) == (["a"], True)
    assert _arguments(None, {"args": ["a"], "kwargs": {"suspect": True}}) == (["a"], True)
    assert _arguments(None, [["a", "b"], {}, {}]) == (["a", "b"], False)
    assert _arguments(None, [["a"], {"suspect": "yes"}, {}]) == (["a"], False)
    assert _arguments(None, [["a"]]) == (["a"], False)


def test_shared_settle_calls_settled_once_after_acking_or_requeueing() -> None:
    calls: list[str] = []
    settle = SharedSettle(
        2,
        ack=lambda: calls.append("ack"),
        requeue=lambda: calls.append("requeue"),
        settled=lambda: calls.append("settled"),
    )
    settle.ack()
    assert calls == []
    settle.requeue()
    assert calls == ["requeue", "settled"]


def test_hold_prefetch_takes_a_slot_per_extra_job_and_gives_exactly_that_back() -> None:
    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), 6)
    first = hold_prefetch(qos, 3)  # a message of 4 jobs
    second = hold_prefetch(qos, 3)  # 3 slots left: prefetch stops at 1, so it takes 2
    assert (first, second, qos.value) == (3, 2, 1)
    assert hold_prefetch(qos, 0) == 0  # a single job's message takes only its own slot
    give_back_prefetch(qos, second)
    give_back_prefetch(qos, first)
    assert qos.value == 6
