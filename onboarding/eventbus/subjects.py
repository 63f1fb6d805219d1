"""The subjects the event bus publishes on and filters by, named in one place.

A contract event travels on its own subject (``user.registered``). A copy meant for one consumer
only, a dead letter replayed or a reconcile repair, travels on ``replay.<consumer>.<subject>``:
only that consumer's durable filters ``replay.<consumer>.>``, so the other services, which
handled the event, never see it.
"""

from __future__ import annotations

REPLAY_PREFIX = "replay"


def replay_subject(consumer: str, subject: str) -> str:
    """Where a copy of an event on ``subject`` goes to reach ``consumer`` alone."""
    return f"{REPLAY_PREFIX}.{consumer}.{subject}"


def replay_filter(consumer: str) -> str:
    """The extra filter subject of ``consumer``'s durable: replays addressed to it."""
    return f"{REPLAY_PREFIX}.{consumer}.>"


def original_subject(consumer: str, subject: str) -> str:
    """The event subject of a message, whether it is the original or a replay."""
    prefix = f"{REPLAY_PREFIX}.{consumer}."
    return subject[len(prefix):] if subject.startswith(prefix) else subject


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` stands for one token, a final ``>`` for one or more."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)
