"""What JetStream will never take as it is: the rows the relay sets aside.

A refusal counts one attempt on its row, and after ``OUTBOX_MAX_ATTEMPTS`` the row is set aside
so that it cannot hold back the rows behind it. Anything else may pass (NATS down or slow, a
stream without a leader) and counts no attempt: an outage never sets the outbox aside.
"""

from __future__ import annotations

from django.conf import settings
from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.js.errors import APIError

from onboarding.eventbus.nats.publish import MessageTooLarge, describe
from onboarding.eventbus.outbox.store import OutboundMessage
from onboarding.eventbus.subjects import subject_matches

# JetStream's answers about the message itself, which no retry changes.
REFUSING_API_CODES = {10054}  # message size exceeds the stream's max_msg_size


def refusal(message: OutboundMessage, error: BaseException) -> str | None:
    """Why JetStream will never take ``message`` as it is, or None when ``error`` may pass.

    Refused: a subject the stream does not take (``NATS_STREAM_SUBJECTS``, the subjects
    ``setup_jetstream`` gives it), a message over the server's ``max_payload`` or the stream's
    ``max_msg_size``, a subject or header the client rejects. Everything else may pass and
    counts no attempt: NATS down or slow, a stream without a leader or not created yet
    (``NoStreamResponseError`` for a subject the stream is meant to take), a denied publish
    (the server drops it silently: a timeout).
    """
    subjects = settings.NATS_STREAM_SUBJECTS
    if not any(subject_matches(message.subject, pattern) for pattern in subjects):
        return (f"stream {settings.NATS_STREAM} does not take subject {message.subject!r} "
                f"(it takes {', '.join(subjects)}): {describe(error)}")
    if isinstance(error, MessageTooLarge | MaxPayloadError | BadSubjectError | BadHeaderError):
        return describe(error)
    if isinstance(error, APIError) and error.err_code in REFUSING_API_CODES:
        return describe(error)
    return None
