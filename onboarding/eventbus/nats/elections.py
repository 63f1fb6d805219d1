"""What JetStream answers while a stream or a consumer has no leader for a moment.

A clustered stream's (or durable's) leader killed, or handing its leadership over (a node in
lame-duck mode), leaves it without a leader for the election: 0.5-8 s here. Meanwhile a publish
meets no responder (``NoStreamResponseError``) and a request to the durable a 503
(``ServiceUnavailableError``), both at once. Backing off exponentially from such an answer
overshoots the election by up to one step (measured in the rehearsal's leader kills: the relay
slept 4 s more after the new leader was there, one user waited 14.5 s), so the loops retry
these within a second for a while (``runtime.lifecycle.Backoff.next(quick=True)``).
"""

from __future__ import annotations

from nats.js.errors import NoStreamResponseError, ServiceUnavailableError


def during_election(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is JetStream saying that the stream
    or the durable has no leader right now."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, NoStreamResponseError | ServiceUnavailableError):
            return True
        error, seen = error.__cause__, seen + 1
    return False
