"""The event contract: the only thing the bounded contexts share.

The producer (accounts) builds events with these classes and consumers parse every incoming
message with ``parse_event``. Parsing is strict about what consumers rely on (types, UUID,
timestamp with a zone, length limits that fit every context's columns) and tolerant of what they
do not (unknown extra keys are ignored, so producers can add fields without breaking anyone).

A message that fails the contract can never succeed on a retry: ``ContractError`` marks a
*permanent* failure, and the consumer runner sets such messages aside at once. ``parse_event``
raises nothing else, whatever the bytes (tests/test_contracts_fuzz.py fuzzes it).

Strict means one spelling for each value, so that every consumer, in any language, reads the
same event: the payload is UTF-8 JSON with each key once; ``userId`` (and each of an
announcement's ``userIds``) is a UUID in its canonical 36-character form; every timestamp
(``registrationTimestamp``, ``deletedAt``, ``renamedAt``, ``onboardedAt``, ``erasedAt``) is an
RFC 3339 date and time (ISO 8601's profile for the internet, in ASCII) with a zone and an
instant that exists in UTC; text fields hold no control characters and no lone surrogates (a
database column could not store them).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from typing import ClassVar

from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator

# Header carrying the contract version of the payload. Absent means version 1, so that an event
# published by hand (``nats pub``) still parses.
VERSION_HEADER = "Event-Version"
# JetStream deduplicates publishes by this header; it carries the stable event id.
MSG_ID_HEADER = "Nats-Msg-Id"
# The event's identity for consumers' inboxes. Equal to Nats-Msg-Id when first published; a
# replay to one consumer is a new message (new Nats-Msg-Id) of the same event (same Event-Id).
EVENT_ID_HEADER = "Event-Id"

USERNAME_MAX_LENGTH = 150  # accounts.User.username; players.Player.username
EMAIL_MAX_LENGTH = 254  # RFC 5321 path limit, Django's EmailField default
TIMESTAMP_MAX_LENGTH = 64

_validate_email = EmailValidator()
# Django compiles the validator's expressions on first use (~25 ms): at import instead, so that
# a process's first event (or registration) does not wait for them.
_validate_email("warm-up@example.com")

# Canonical forms only: uuid.UUID() and int() also read braces, "urn:uuid:", missing hyphens,
# surrounding blanks and non-ASCII digits (fullwidth, Arabic-Indic...), and fromisoformat()
# takes any character at all between the date and the time.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?"
)
# C0 and C1 controls (NUL among them) and lone surrogates, which UTF-8 cannot encode.
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ContractError(ValueError):
    """The message is not a valid event of the contract: a permanent failure."""


def _format_timestamp(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("an event's timestamps must be timezone-aware")
    text = value.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def _require_str(data: dict, key: str, max_length: int) -> str:
    if key not in data:
        raise ContractError(f"{key}: required")
    value = data[key]
    if not isinstance(value, str):
        raise ContractError(f"{key}: expected a string, got {type(value).__name__}")
    if not value:
        raise ContractError(f"{key}: must not be empty")
    if len(value) > max_length:
        raise ContractError(f"{key}: longer than {max_length} characters ({len(value)})")
    bad = _UNSTORABLE.search(value)
    if bad:
        raise ContractError(f"{key}: control character or lone surrogate {bad.group()!r}")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: a key given twice is ambiguous (JSON parsers disagree on which wins)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ContractError(f"payload: key {twice[:64]!r} given more than once")
    return data


def _require_user_id(data: dict) -> uuid.UUID:
    raw_id = _require_str(data, "userId", 36)
    if not _UUID.fullmatch(raw_id):
        raise ContractError(f"userId: not a UUID: {raw_id!r}")
    return uuid.UUID(raw_id)


def _require_timestamp(data: dict, key: str) -> dt.datetime:
    raw_ts = _require_str(data, key, TIMESTAMP_MAX_LENGTH)
    form = _RFC3339.fullmatch(raw_ts)
    try:
        timestamp = dt.datetime.fromisoformat(raw_ts) if form else None
    except ValueError:  # the right shape, but no such date or time (February 30th...)
        timestamp = None
    if timestamp is None:
        raise ContractError(f"{key}: not ISO 8601 (RFC 3339): {raw_ts!r}")
    if form["zone"] is None:
        raise ContractError(f"{key}: no time zone: {raw_ts!r}")
    try:
        # In UTC, as it is published again; near year 1 or 9999 an offset can leave the
        # calendar.
        return timestamp.astimezone(dt.UTC)
    except OverflowError:
        raise ContractError(f"{key}: out of range in UTC: {raw_ts!r}") from None


def _require_object(data: object) -> dict:
    if not isinstance(data, dict):
        raise ContractError(f"payload: expected a JSON object, got {type(data).__name__}")
    return data


class _UserEvent:
    """What every event of the contract has: it is about one user, whose id is its key.

    ``key`` is what the event bus files the event under (the outbox, the stream's sequence
    ledger): erasing a user deletes every message with that key from the stream.
    """

    subject: ClassVar[str]
    version: ClassVar[int]
    user_id: uuid.UUID

    @property
    def key(self) -> str:
        return str(self.user_id)

    @property
    def published_subject(self) -> str:
        """The subject this event is published on (``subject`` may be a pattern: a service's
        announcements are published on a subject of their own)."""
        return self.subject

    def to_payload(self) -> dict:
        raise NotImplementedError

    def to_json(self) -> bytes:
        return json.dumps(self.to_payload(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class UserRegistered(_UserEvent):
    """``user.registered``: a new user exists in the Auth Service. Broadcast to every context.

    Carries personal data (the username and the e-mail): a later ``user.deleted`` erases its
    message from the stream.
    """

    subject: ClassVar[str] = "user.registered"
    version: ClassVar[int] = 1

    user_id: uuid.UUID
    username: str
    email: str
    registration_timestamp: dt.datetime

    def to_payload(self) -> dict:
        return {
            "userId": str(self.user_id),
            "username": self.username,
            "email": self.email,
            "registrationTimestamp": _format_timestamp(self.registration_timestamp),
        }

    @classmethod
    def from_payload(cls, data: object) -> UserRegistered:
        data = _require_object(data)
        user_id = _require_user_id(data)
        username = _require_str(data, "username", USERNAME_MAX_LENGTH)
        email = _require_str(data, "email", EMAIL_MAX_LENGTH)
        try:
            _validate_email(email)
        except ValidationError:
            raise ContractError(f"email: not a valid address: {email!r}") from None
        timestamp = _require_timestamp(data, "registrationTimestamp")
        return cls(
            user_id=user_id, username=username, email=email, registration_timestamp=timestamp
        )


@dataclass(frozen=True)
class UserDeleted(_UserEvent):
    """``user.deleted``: the user erased their account (or staff erased it). Broadcast.

    Each context deletes the user's rows and keeps a tombstone, so that an older
    ``user.registered`` arriving later (a replay, a repair, a consumer that was down) creates
    nothing. Carries no personal data: only the id and when.
    """

    subject: ClassVar[str] = "user.deleted"
    version: ClassVar[int] = 1

    user_id: uuid.UUID
    deleted_at: dt.datetime

    def to_payload(self) -> dict:
        return {"userId": str(self.user_id), "deletedAt": _format_timestamp(self.deleted_at)}

    @classmethod
    def from_payload(cls, data: object) -> UserDeleted:
        data = _require_object(data)
        return cls(user_id=_require_user_id(data),
                   deleted_at=_require_timestamp(data, "deletedAt"))


@dataclass(frozen=True)
class UserRenamed(_UserEvent):
    """``user.renamed``: the user's username changed. Contexts that keep a copy update it.

    Carries personal data (the new name): the user's erasure deletes it from the stream too.
    """

    subject: ClassVar[str] = "user.renamed"
    version: ClassVar[int] = 1

    user_id: uuid.UUID
    username: str
    renamed_at: dt.datetime

    def to_payload(self) -> dict:
        return {
            "userId": str(self.user_id),
            "username": self.username,
            "renamedAt": _format_timestamp(self.renamed_at),
        }

    @classmethod
    def from_payload(cls, data: object) -> UserRenamed:
        data = _require_object(data)
        return cls(user_id=_require_user_id(data),
                   username=_require_str(data, "username", USERNAME_MAX_LENGTH),
                   renamed_at=_require_timestamp(data, "renamedAt"))


# A service's name, as its announcements' subjects carry it: an app label.
_SERVICE = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _require_service(data: dict) -> str:
    service = _require_str(data, "service", 63)
    if not _SERVICE.fullmatch(service):
        raise ContractError(f"service: not a service name: {service!r}")
    return service


# Users per announcement: one handled batch's, cut into pieces of this size (36 bytes and
# quotes each: ~40 KB, far below NATS's 1 MB payload limit).
MAX_USERS_PER_ANNOUNCEMENT = 1000


def _require_user_ids(data: dict) -> tuple[uuid.UUID, ...]:
    if "userIds" not in data and "userId" in data:
        # The first shape (one user per announcement, main before the batching): still read,
        # so that what an earlier version left unpublished or on the stream is not set aside.
        return (_require_user_id(data),)
    if "userIds" not in data:
        raise ContractError("userIds: required")
    raw_ids = data["userIds"]
    if not isinstance(raw_ids, list):
        raise ContractError(f"userIds: expected a list, got {type(raw_ids).__name__}")
    if not raw_ids:
        raise ContractError("userIds: must not be empty")
    if len(raw_ids) > MAX_USERS_PER_ANNOUNCEMENT:
        raise ContractError(f"userIds: more than {MAX_USERS_PER_ANNOUNCEMENT} ({len(raw_ids)})")
    user_ids = []
    for raw_id in raw_ids:
        if not isinstance(raw_id, str) or not _UUID.fullmatch(raw_id):
            raise ContractError(f"userIds: not a UUID: {raw_id!r:.64}")
        user_ids.append(uuid.UUID(raw_id))
    if len(set(user_ids)) != len(user_ids):
        raise ContractError("userIds: a user given more than once")
    return tuple(user_ids)


class _ServiceAnnouncement(_UserEvent):
    """What a service announces of the work it did for users, on ``<prefix>.<service>``.

    The service is the subject's last token, so that the server's permissions let each
    service publish its own announcements only (deploy/nats/auth.conf), and consumers filter on
    ``<prefix>.*``. The payload names the service too; a message whose payload and subject
    disagree breaks the contract. Carries no personal data: the users' ids, the service, when.

    One announcement speaks for every user of the transaction that did the work (a consumer's
    batch, up to :data:`MAX_USERS_PER_ANNOUNCEMENT` each), not one per user: a row, a publish
    and a projection update per batch rather than per user, which halved the drain when it was
    one per user (docs/benchmarks.md). So it has no single user to be filed under (``key`` is
    None), and erasing a user leaves it on the stream: it holds ids only, which the erased
    user's tombstones keep too.
    """

    prefix: ClassVar[str]
    service: str
    user_ids: tuple[uuid.UUID, ...]

    @property
    def key(self) -> None:
        return None

    @property
    def published_subject(self) -> str:
        return f"{self.prefix}.{self.service}"

    def __post_init__(self) -> None:
        if not 0 < len(self.user_ids) <= MAX_USERS_PER_ANNOUNCEMENT:
            raise ValueError(f"an announcement names 1 to {MAX_USERS_PER_ANNOUNCEMENT} users, "
                             f"not {len(self.user_ids)}")


@dataclass(frozen=True)
class UserOnboarded(_ServiceAnnouncement):
    """``user.onboarded.<service>``: the service has created all of these users' defaults, in
    the transaction that applied their ``user.registered`` there. Accounts keeps the readiness
    the game client polls from these (``manage.py consume accounts``).
    """

    prefix: ClassVar[str] = "user.onboarded"
    subject: ClassVar[str] = "user.onboarded.*"
    version: ClassVar[int] = 1

    service: str
    user_ids: tuple[uuid.UUID, ...]
    onboarded_at: dt.datetime

    def to_payload(self) -> dict:
        return {"service": self.service, "userIds": [str(u) for u in self.user_ids],
                "onboardedAt": _format_timestamp(self.onboarded_at)}

    @classmethod
    def from_payload(cls, data: object) -> UserOnboarded:
        data = _require_object(data)
        return cls(service=_require_service(data), user_ids=_require_user_ids(data),
                   onboarded_at=_require_timestamp(data, "onboardedAt"))


@dataclass(frozen=True)
class UserErased(_ServiceAnnouncement):
    """``user.erased.<service>``: the service has deleted these users' rows and keeps a
    tombstone for each (its handling of ``user.deleted``). Final: nothing is created for them
    there again.
    """

    prefix: ClassVar[str] = "user.erased"
    subject: ClassVar[str] = "user.erased.*"
    version: ClassVar[int] = 1

    service: str
    user_ids: tuple[uuid.UUID, ...]
    erased_at: dt.datetime

    def to_payload(self) -> dict:
        return {"service": self.service, "userIds": [str(u) for u in self.user_ids],
                "erasedAt": _format_timestamp(self.erased_at)}

    @classmethod
    def from_payload(cls, data: object) -> UserErased:
        data = _require_object(data)
        return cls(service=_require_service(data), user_ids=_require_user_ids(data),
                   erased_at=_require_timestamp(data, "erasedAt"))


# By subject, or subject pattern (``user.onboarded.*``).
EVENT_TYPES: dict[str, type[_UserEvent]] = {
    event.subject: event
    for event in (UserRegistered, UserDeleted, UserRenamed, UserOnboarded, UserErased)
}


def event_type_of(subject: str) -> type[_UserEvent] | None:
    """The contract class of a message published on ``subject`` (None: no such event)."""
    found = EVENT_TYPES.get(subject)
    if found is None and "." in subject:
        found = EVENT_TYPES.get(subject.rsplit(".", 1)[0] + ".*")
    return found


def event_headers(event, *, event_id: uuid.UUID | str) -> dict[str, str]:
    """The headers every published event carries."""
    return {
        MSG_ID_HEADER: str(event_id),
        EVENT_ID_HEADER: str(event_id),
        VERSION_HEADER: str(event.version),
    }


def parse_event(subject: str, data: bytes, headers: dict | None = None):
    """Decode and validate a message; raise ``ContractError`` if it breaks the contract."""
    event_type = event_type_of(subject)
    if event_type is None:
        raise ContractError(f"unknown event subject {subject!r}")
    version = (headers or {}).get(VERSION_HEADER, "1")
    if version != str(event_type.version):
        raise ContractError(f"unsupported {subject} version {version!r}")
    try:
        # UTF-8 only (RFC 8259): json.loads(bytes) would also guess UTF-16 and UTF-32.
        decoded = json.loads(str(data, "utf-8"), object_pairs_hook=_unique_keys)
    except ContractError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ContractError(f"payload is not JSON: {exc}") from None
    event = event_type.from_payload(decoded)
    if event.published_subject != subject:
        raise ContractError(
            f"service: {event.service!r} announced on another service's subject {subject!r}")
    return event
