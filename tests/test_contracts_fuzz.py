"""The event decoder fuzzed: whatever arrives, ``parse_event`` returns an event or raises
``ContractError``, never anything else, and every event it accepts survives a round trip.

Reproducible and bounded: ``derandomize`` draws the same examples on every run (a failure in CI
fails the same way on a laptop), ``database=None`` writes no example database into the checkout,
and ``max_examples`` keeps the whole file to a few seconds. Each bug these tests found is pinned
by an ``@example`` so it stays covered whatever the generator draws.
"""

from __future__ import annotations

import datetime as dt
import json
import string
import uuid

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from onboarding.contracts import (
    EMAIL_MAX_LENGTH,
    USERNAME_MAX_LENGTH,
    VERSION_HEADER,
    ContractError,
    UserDeleted,
    UserRegistered,
    UserRenamed,
    event_headers,
    parse_event,
)

SUBJECT = UserRegistered.subject
FIELDS = ("userId", "username", "email", "registrationTimestamp")
VALID = {
    "userId": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "username": "alice",
    "email": "alice@example.com",
    "registrationTimestamp": "2026-01-02T03:04:05.000006Z",
}

fuzz = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,  # the machine is shared: a slow example is not a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def decode(data: bytes, headers: dict | None = None, subject: str = SUBJECT):
    """parse_event's verdict: the event, or None for a ContractError. Anything else escapes and
    fails the test. An accepted event must be storable (a database's text columns take neither
    NUL nor lone surrogates) and serialize and parse back to itself."""
    try:
        event = parse_event(subject, data, headers)
    except ContractError:
        return None
    for text in (event.username, event.email):  # what every context's text columns can hold
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogates
    again = parse_event(SUBJECT, event.to_json(), event_headers(event, event_id=uuid.uuid4()))
    assert again == event
    assert again.to_json() == event.to_json()
    return event


def rejected(data: bytes, headers: dict | None = None, subject: str = SUBJECT) -> bool:
    return decode(data, headers, subject) is None


# -- hostile building blocks ---------------------------------------------------------------------

# Characters that look like ASCII ones, or that int() and friends read as ASCII digits.
FULLWIDTH = {chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)}
ARABIC_INDIC = {str(d): chr(0x0660 + d) for d in range(10)}
MATH_BOLD = {str(d): chr(0x1D7CE + d) for d in range(10)}
CYRILLIC = dict(zip("aceiopxyABCEHKMOPTX", "асеіорхуАВСЕНКМОРТХ", strict=True))
LOOKALIKES = [FULLWIDTH, ARABIC_INDIC, MATH_BOLD, CYRILLIC]


@st.composite
def confusable(draw, text: str) -> str:
    """``text`` with some characters swapped for look-alikes (at least one swapped)."""
    table = draw(st.sampled_from(LOOKALIKES))
    positions = [i for i, c in enumerate(text) if c in table]
    if not positions:
        table, positions = FULLWIDTH, [i for i, c in enumerate(text) if c in FULLWIDTH]
    chosen = draw(st.sets(st.sampled_from(positions), min_size=1))
    return "".join(table[c] if i in chosen else c for i, c in enumerate(text))


def huge_strings(max_length: int = 300_000):
    """Long strings cheaply: one or two characters repeated (hypothesis's own text strategy
    stays small)."""
    return st.builds(
        lambda a, b, n: (a + b) * n,
        st.characters(), st.characters(), st.integers(0, max_length // 2),
    )


def with_inserted(text: str, inserts):
    return st.builds(
        lambda at, piece: text[:at] + piece + text[at:],
        st.integers(0, len(text)), inserts,
    )


SURROGATES = st.characters(categories=["Cs"])
CONTROL = st.characters(categories=["Cc"])


def hostile_strings(valid: str):
    """Strings a broken or malicious producer could put where ``valid`` belongs."""
    return st.one_of(
        st.text(),
        st.just(""),
        confusable(valid),
        with_inserted(valid, st.just("\x00")),
        with_inserted(valid, SURROGATES),
        with_inserted(valid, CONTROL),
        with_inserted(valid, st.sampled_from(["\u200b", "\ufeff", "\u202e", " ", "\n"])),
        st.builds(lambda v: v.upper(), st.just(valid)),
        st.builds(lambda v, n: v + "x" * n, st.just(valid), st.integers(1, 400)),
        huge_strings(),
    )


def wrong_types():
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    )


def hostile_values(field: str):
    return st.one_of(hostile_strings(VALID[field]), wrong_types())


def dump(data, ensure_ascii: bool) -> bytes:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8 (CESU-8), as a
    # careless producer in another language would send them.
    text = json.dumps(data, ensure_ascii=ensure_ascii, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def raw_object(pairs) -> bytes:
    """A JSON object from (key, raw JSON text) pairs, kept in order and with any duplicates."""
    body = ",".join(f"{json.dumps(key)}:{value}" for key, value in pairs)
    return ("{" + body + "}").encode()


# Raw JSON texts json.dumps would never write (or would write differently).
raw_json_values = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "null", "true", "{}", "[]"]),
    st.builds(lambda n: "1" * n, st.integers(1, 20_000)),  # big ints, past int()'s digit limit
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 100_000)),
    st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(1, 100_000)),
)


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "unclosed":
        return b"[" * depth
    # the nesting inside a field of an otherwise valid event
    inner = "[" * depth + "]" * depth
    return raw_object([(k, json.dumps(v)) for k, v in VALID.items()] + [("extra", inner)])


# -- the properties ------------------------------------------------------------------------------


@fuzz
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    decode(data)


@fuzz
@given(encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                 "utf-32-be", "utf-8-sig"]))
def test_json_is_utf_8_only(encoding):
    """RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16/32 from bytes)."""
    assert rejected(json.dumps(VALID).encode(encoding))


@fuzz
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255),
                                st.sampled_from(["replace", "insert", "delete"])),
                      min_size=1, max_size=8))
def test_a_valid_payload_with_its_bytes_mangled(edits):
    payload = bytearray(json.dumps(VALID).encode())
    for at, byte, how in edits:
        at %= len(payload) + 1
        if how == "insert":
            payload.insert(at, byte)
        elif at < len(payload):
            if how == "replace":
                payload[at] = byte
            else:
                del payload[at]
    decode(bytes(payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text()), children, max_size=5),
    max_leaves=20,
)


@fuzz
@given(value=json_values, ensure_ascii=st.booleans())
def test_arbitrary_json(value, ensure_ascii):
    decode(dump(value, ensure_ascii))


def field_and(values):
    return st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), values(f)))


@fuzz
@given(case=field_and(hostile_values), ensure_ascii=st.booleans())
@example(case=("username", "ali\x00ce"), ensure_ascii=True)  # PostgreSQL refuses NUL in text
@example(case=("username", "ali\ud800ce"), ensure_ascii=True)  # no UTF-8 for a lone surrogate
@example(case=("username", "ali\nce"), ensure_ascii=False)
def test_one_field_replaced_by_a_hostile_value(case, ensure_ascii):
    field, value = case
    decode(dump({**VALID, field: value}, ensure_ascii))


@fuzz
@given(field=st.sampled_from(FIELDS), raw=raw_json_values)
def test_one_field_replaced_by_raw_json(field, raw):
    assert rejected(raw_object([(k, raw if k == field else json.dumps(v))
                                for k, v in VALID.items()]))


@fuzz
@given(field=st.sampled_from(FIELDS))
def test_a_field_missing(field):
    assert rejected(json.dumps({k: v for k, v in VALID.items() if k != field}).encode())


@fuzz
@given(depth=st.integers(1, 200_000),
       kind=st.sampled_from(["array", "object", "unclosed", "in-a-field"]))
@example(depth=100_000, kind="array")
@example(depth=100_000, kind="object")
@example(depth=100_000, kind="in-a-field")
def test_deep_nesting(depth, kind):
    event = decode(nested(depth, kind))
    assert event is None or kind == "in-a-field"


@settings(fuzz, max_examples=40)  # each example parses up to 20,000 keys
@given(extra=st.integers(0, 20_000), value=json_values)
def test_wide_objects_keep_only_the_contract(extra, value):
    pairs = [(k, json.dumps(v)) for k, v in VALID.items()]
    pairs += [(f"x{i}", json.dumps(value, allow_nan=True)) for i in range(extra)]
    event = decode(raw_object(pairs))
    assert event is not None and event.username == "alice"


@fuzz
@given(case=field_and(lambda f: st.one_of(hostile_values(f), st.just(VALID[f]))),
       first=st.booleans())
@example(case=("userId", VALID["userId"].upper()), first=False)
@example(case=("username", "mallory"), first=True)
def test_duplicate_keys(case, first):
    """A key given twice is ambiguous (parsers disagree on which value counts): rejected."""
    field, other = case
    pairs = [(k, json.dumps(v)) for k, v in VALID.items()]
    twin = (field, json.dumps(other, allow_nan=True))
    pairs.insert(0 if first else len(pairs), twin)
    assert rejected(raw_object(pairs))


@fuzz
@given(user_id=st.uuids().flatmap(lambda u: confusable(str(u))))
@example(user_id="e\uff13e70682-c209-4cac-629f-6fbed82c07cd")  # a fullwidth 3
@example(user_id="0f8fad5b-d9cb-469f-a165-70867728950\u0665")  # an Arabic-Indic 5
def test_uuids_with_look_alike_characters(user_id):
    assert rejected(json.dumps({**VALID, "userId": user_id}).encode())


@fuzz
@given(user_id=st.one_of(
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "urn:uuid:" + str(u)[:27]),
    st.uuids().map(lambda u: " " + str(u)[1:]),
    st.uuids().map(lambda u: str(u)[:-1] + " "),
    st.uuids().map(lambda u: str(u).replace("-", "_")),
    st.text(alphabet=string.hexdigits + "-{}: _", max_size=40),
))
@example(user_id=VALID["userId"].replace("-", ""))
@example(user_id="{" + VALID["userId"] + "}")
@example(user_id=" " + VALID["userId"][1:])
def test_uuids_in_any_form_but_the_canonical_one(user_id):
    event = decode(json.dumps({**VALID, "userId": user_id}).encode())
    assert event is None or str(event.user_id) == user_id.lower()


@fuzz
@given(user_id=st.uuids(), upper=st.booleans())
def test_canonical_uuids_in_either_case(user_id, upper):
    text = str(user_id).upper() if upper else str(user_id)
    assert decode(json.dumps({**VALID, "userId": text}).encode()).user_id == user_id


offsets = st.timedeltas(min_value=-dt.timedelta(hours=23, minutes=59),
                        max_value=dt.timedelta(hours=23, minutes=59))


@fuzz
@given(moment=st.datetimes(timezones=st.builds(dt.timezone, offsets)),
       timespec=st.sampled_from(["auto", "seconds", "milliseconds", "microseconds"]))
@example(moment=dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=1))),
         timespec="auto")
@example(moment=dt.datetime(1, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))),
         timespec="auto")
def test_timestamps_at_the_ends_of_the_calendar(moment, timespec):
    """Every zone offset on every date: accepted only if it is a real instant in UTC."""
    event = decode(json.dumps({**VALID, "registrationTimestamp":
                               moment.isoformat(timespec=timespec)}).encode())
    if event is not None:
        assert event.registration_timestamp == moment


@fuzz
@given(text=st.one_of(
    st.text(max_size=70),
    confusable(VALID["registrationTimestamp"]),
    st.builds(lambda t: t.replace("Z", ""), st.just(VALID["registrationTimestamp"])),
    st.sampled_from(["2026-01-01T24:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T00:00:60Z",
                     "2026-W01-1T00:00Z", "20260101T000000Z", "2026-01-01T00:00:00+24:00",
                     "2026-01-01T00:00:00+05:30:15.5", "2026-01-01 00:00:00+00:00"]),
))
@example(text="2026-01-02\u041a03:04:05Z")  # fromisoformat takes any separator (here Cyrillic)
@example(text="2026-01-02T03:04:05\uff3a")  # a fullwidth Z
def test_timestamps_that_are_not_iso_8601_with_a_zone(text):
    event = decode(json.dumps({**VALID, "registrationTimestamp": text}).encode())
    assert event is None or event.registration_timestamp.utcoffset() is not None
    if any(c in text for table in LOOKALIKES for c in table.values()):
        assert event is None


@fuzz
@given(version=st.one_of(
    st.text(max_size=10),
    confusable("1"),
    st.sampled_from([" 1", "1 ", "01", "1.0", "+1", "2", "0", "-1", "١", "¹", "一", "", "v1"]),
), headers=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5))
def test_versions_and_headers(version, headers):
    data = json.dumps(VALID).encode()
    event = decode(data, {**headers, VERSION_HEADER: version})
    assert (event is not None) == (version == "1")
    without = {k: v for k, v in headers.items() if k != VERSION_HEADER}
    assert decode(data, without) is not None  # no version header: version 1


@fuzz
@given(subject=st.one_of(st.text(max_size=40), confusable(SUBJECT),
                         st.sampled_from([SUBJECT.upper(), SUBJECT + " ", SUBJECT + "\x00",
                                          "user.registered.v2", "user.*", ">", ""])))
def test_unknown_subjects(subject):
    assert (decode(json.dumps(VALID).encode(), subject=subject) is None) == (subject != SUBJECT)


usernames = st.text(
    alphabet=st.characters(exclude_categories=["Cs", "Cc"]),
    min_size=1, max_size=USERNAME_MAX_LENGTH,
)
local_parts = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-",
                      min_size=1, max_size=64)
domains = st.lists(st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1,
                           max_size=20), min_size=1, max_size=4).map(
    lambda labels: ".".join(labels) + ".com")
emails = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains).filter(
    lambda email: len(email) <= EMAIL_MAX_LENGTH)
events = st.builds(
    UserRegistered,
    user_id=st.uuids(),
    username=usernames,
    email=emails,
    registration_timestamp=st.datetimes(
        min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
        timezones=st.builds(dt.timezone, offsets),
    ),
)


@fuzz
@given(event=events, version=st.sampled_from([None, "1"]))
def test_valid_events_round_trip(event, version):
    headers = event_headers(event, event_id=uuid.uuid4())
    if version is None:
        headers.pop(VERSION_HEADER)
    assert decode(event.to_json(), headers) == event


# -- for the consumers: whole messages that break the contract (tests/test_consumer_fuzz.py) ------


def _with_invalid_utf_8(at: int, junk: bytes) -> bytes:
    text = json.dumps(VALID).encode()
    at = text.index(b'"alice"') + 1 + at % 5  # inside the username string
    return text[:at] + junk + text[at:]


hostile_payloads = st.one_of(
    st.binary(max_size=512),
    st.builds(dump, json_values, st.booleans()),
    st.builds(lambda case, ascii_only: dump({**VALID, case[0]: case[1]}, ascii_only),
              field_and(hostile_values), st.booleans()),
    st.builds(lambda field, raw: raw_object([(k, raw if k == field else json.dumps(v))
                                             for k, v in VALID.items()]),
              st.sampled_from(FIELDS), raw_json_values),
    st.builds(lambda field: raw_object([(k, json.dumps(v)) for k, v in VALID.items()]
                                       + [(field, json.dumps(VALID[field]))]),
              st.sampled_from(FIELDS)),
    st.builds(nested, st.integers(1, 200_000), st.sampled_from(["array", "object", "unclosed"])),
    st.builds(lambda user_id: json.dumps({**VALID, "userId": user_id}).encode(),
              st.uuids().flatmap(lambda u: confusable(str(u)))),
    st.builds(lambda text: json.dumps({**VALID, "registrationTimestamp": text}).encode(),
              confusable(VALID["registrationTimestamp"])),
    st.builds(lambda enc: json.dumps(VALID).encode(enc),
              st.sampled_from(["utf-16", "utf-32", "utf-8-sig"])),
    st.builds(_with_invalid_utf_8, st.integers(0, 4),
              st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"])),
)


# -- user.deleted and user.renamed: the same strictness --------------------------------------------

OTHER_VALID = {
    UserDeleted: {"userId": VALID["userId"], "deletedAt": "2026-01-02T03:04:05.000006Z"},
    UserRenamed: {"userId": VALID["userId"], "username": "alicia",
                  "renamedAt": "2026-01-02T03:04:05Z"},
}
other_types = st.sampled_from(sorted(OTHER_VALID, key=lambda t: t.subject))


def decode_other(event_type, data: bytes, headers: dict | None = None):
    """The verdict for ``event_type``'s subject; an accepted event round-trips."""
    try:
        event = parse_event(event_type.subject, data, headers)
    except ContractError:
        return None
    assert type(event) is event_type
    if isinstance(event, UserRenamed):
        assert "\x00" not in event.username
        event.username.encode("utf-8")
    again = parse_event(event_type.subject, event.to_json(),
                        event_headers(event, event_id=uuid.uuid4()))
    assert again == event and again.to_json() == event.to_json()
    return event


@fuzz
@given(event_type=other_types, data=st.binary(max_size=2048))
def test_other_types_take_arbitrary_bytes(event_type, data):
    decode_other(event_type, data)


@fuzz
@given(event_type=other_types, value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=4),
    max_leaves=12,
))
def test_other_types_take_arbitrary_json(event_type, value):
    decode_other(event_type, json.dumps(value).encode())


@fuzz
@given(event_type=other_types, data=st.data())
def test_other_types_with_one_field_hostile_or_missing(event_type, data):
    valid = OTHER_VALID[event_type]
    field = data.draw(st.sampled_from(sorted(valid)))
    missing = {k: v for k, v in valid.items() if k != field}
    assert decode_other(event_type, json.dumps(missing).encode()) is None
    hostile = {**valid, field: data.draw(st.one_of(hostile_strings(valid[field]), wrong_types()))}
    event = decode_other(event_type, dump(hostile, ensure_ascii=data.draw(st.booleans())))
    if event is not None and field != "username":  # the id and the time are exact spellings
        assert hostile[field] in (valid[field], valid[field].upper()) or field.endswith("At")


@fuzz
@given(event_type=other_types, version=st.sampled_from(["1", "2", "0", " 1", ""]))
def test_other_types_versions(event_type, version):
    data = json.dumps(OTHER_VALID[event_type]).encode()
    assert (decode_other(event_type, data, {VERSION_HEADER: version}) is not None) == (
        version == "1")


def test_a_registration_payload_is_not_a_deletion():
    """Each subject has its own contract: a payload of one type is refused on another's."""
    assert decode_other(UserDeleted, json.dumps(VALID).encode()) is None
    assert decode_other(UserRenamed, json.dumps(VALID).encode()) is None
    assert decode_other(UserDeleted, json.dumps(OTHER_VALID[UserRenamed]).encode()) is None


deleted_events = st.builds(UserDeleted, user_id=st.uuids(), deleted_at=st.datetimes(
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
    timezones=st.builds(dt.timezone, offsets)))
renamed_events = st.builds(UserRenamed, user_id=st.uuids(), username=usernames,
                           renamed_at=st.datetimes(
                               min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                               timezones=st.builds(dt.timezone, offsets)))


@fuzz
@given(event=st.one_of(deleted_events, renamed_events))
def test_other_valid_events_round_trip(event):
    assert decode_other(type(event), event.to_json(),
                        event_headers(event, event_id=uuid.uuid4())) == event
