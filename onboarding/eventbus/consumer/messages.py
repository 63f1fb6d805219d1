"""What the consumer's log lines say about a JetStream message: its ids and fields."""

from __future__ import annotations

from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER
from onboarding.eventbus.deadletters.store import payload_user_id


def event_id_of(msg) -> str:
    """The event's stable id: Event-Id, else Nats-Msg-Id, else its place in the stream."""
    headers = msg.headers or {}
    return (
        headers.get(EVENT_ID_HEADER)
        or headers.get(MSG_ID_HEADER)
        or f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"
    )


def message_ids(msgs: list) -> str:
    """The ids of several messages, for one log line about them all."""
    return (f"seq={','.join(str(msg.metadata.sequence.stream) for msg in msgs)} "
            f"event_ids={','.join(event_id_of(msg) for msg in msgs)}")


def event_fields(consumer: str, msg, outcome: str, user_id: str | None = None, *, meta=None,
                 event_id: str | None = None, **more) -> dict:
    """The structured fields of a log line about one message (``extra=``; keys in JSON logs).

    ``meta``, ``event_id``: the message's, if the caller has them (nats-py parses the metadata
    anew at each access).
    """
    meta = meta or msg.metadata
    return {
        "consumer": consumer, "outcome": outcome, "event_id": event_id or event_id_of(msg),
        "user_id": user_id or payload_user_id(bytes(msg.data)) or None,
        "stream_seq": meta.sequence.stream, "delivery": meta.num_delivered, **more,
    }
