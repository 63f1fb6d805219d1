"""The grown-tables scenario's data: N users' worth of rows, written fast, and what they weigh.

``prefill(n)`` writes what a deployment holds after ``n`` registrations, before any pruning
(``manage.py eventbus_prune``): in the accounts database the ``n`` users and their ``n``
published outbox rows; in each context's database the consumer's ``n`` inbox rows
(``ProcessedEvent``) and each user's default rows (a player; the active "Recruit"; a
progression; HQ and Warehouse). The business rows matter as much as the inbox: a million
processed events means a million users, and an inbox grown beside empty business tables would
leave the business tables' random-key indexes small, and the figure would flatter.

Rows are written the way production writes them: in time order (``processed_at``,
``created_at`` rising over the last six days, inside the stream's seven-day max age, so a prune
would keep the inbox rows), with random keys (UUIDs from ``md5``, the same user and event ids in
every database), into tables whose indexes are in place — an index grown by random inserts is
larger and sparser than one built afresh, and that is the index a deployment has. One
``INSERT ... SELECT generate_series`` per table on PostgreSQL (no ORM), the five databases in
parallel, then ``VACUUM ANALYZE`` (the bench server runs without autovacuum; a deployment's
autovacuum would have run by then).

Used by ``bench/run.py`` (``--only grown``); PostgreSQL only: on SQLite the scenario is skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import time
import uuid

# What one million users take on disk, all tables and indexes together, rounded up (measured:
# see docs/benchmarks.md); the prefill refuses to start without three times that free.
BYTES_PER_MILLION_USERS = 3.5e9
SPREAD = dt.timedelta(days=6)  # the prefilled rows' ages: the last six days


def _tables():
    """The models the prefill writes, by role."""
    from django.contrib.auth import get_user_model

    from buildings.models import Building
    from characters.models import Character
    from onboarding.eventbus.models import OutboxEvent, ProcessedEvent
    from players.models import Player
    from progression.models import MetaProgression

    return {
        "users": get_user_model(), "outbox": OutboxEvent, "inbox": ProcessedEvent,
        "players": Player, "characters": Character, "progression": MetaProgression,
        "buildings": Building,
    }


# Every statement draws on the same series: user i's id, event id and time. Random ids are the
# md5 of a counter (as uuid4 would be for the index) but the same in every database; ordered
# ones start with the row's time in milliseconds, as UUIDv7s do.
SERIES = """
    WITH t AS (
        SELECT i, %(t0)s::timestamptz + i * %(step)s::interval AS ts
        FROM generate_series(1, %(n)s) AS i
    ), s AS (
        SELECT i, ts, {uid} AS uid, {eid} AS eid FROM t
    )
"""
RANDOM_ID = "md5('{kind}' || i)::uuid"
ORDERED_ID = ("overlay(md5('{kind}' || i) placing lpad(to_hex((extract(epoch FROM ts) * 1000)"
              "::bigint), 12, '0') from 1 for 12)::uuid")


def statements(context: str | None, consumer: str | None = None,
               ordered: bool = False) -> list[tuple[str, str, dict]]:
    """(label, SQL, extra params) for one database's part: the accounts' (``context`` None) or
    a context's (its inbox for ``consumer``, and its defaults when it is one of the four)."""
    # Event ids are time-ordered, as the project mints them (onboarding/eventbus/ids.py); user
    # ids are random unless ``ordered`` (the experiment of time-ordered user ids too).
    uid = (ORDERED_ID if ordered else RANDOM_ID).format(kind="user")
    series = SERIES.format(uid=uid, eid=ORDERED_ID.format(kind="event"))
    from buildings.defaults import STARTER_BUILDINGS
    from characters.defaults import DEFAULT_CHARACTER_NAME
    from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER, VERSION_HEADER, UserRegistered
    from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS

    t = {role: model._meta.db_table for role, model in _tables().items()}
    if context is None:
        # A real payload with markers where each user's values go.
        template = UserRegistered(
            user_id=uuid.UUID(int=0), username="@N@", email="@N@@example.com",
            registration_timestamp=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        ).to_json().decode().replace(str(uuid.UUID(int=0)), "@U@")
        # As wide as a deployment's Argon2 hash; nobody logs in as these users.
        password = "argon2$argon2id$v=19$m=102400,t=2,p=8$" + "s" * 22 + "$" + "h" * 43
        return [
            ("users", f"""{series}
                INSERT INTO {t['users']} (id, password, last_login, is_superuser, username,
                    first_name, last_name, email, is_staff, is_active, date_joined)
                SELECT uid, %(password)s, NULL, false, 'grown' || i, '', '',
                    'grown' || i || '@example.com', false, true, ts FROM s""",
             {"password": password}),
            ("outbox", f"""{series}
                INSERT INTO {t['outbox']} (event_id, subject, payload, headers, created_at,
                    published_at, attempts, last_error, set_aside_at)
                SELECT eid, 'user.registered',
                    replace(replace(%(template)s, '@U@', uid::text), '@N@', 'grown' || i),
                    jsonb_build_object(%(msg_id)s, eid::text, %(event_id)s, eid::text,
                                       %(version)s, '1'),
                    ts, ts + interval '3 ms', 0, '', NULL FROM s""",
             {"template": template, "msg_id": MSG_ID_HEADER, "event_id": EVENT_ID_HEADER,
              "version": VERSION_HEADER}),
        ]
    work = [("inbox", f"""{series}
        INSERT INTO {t['inbox']} (consumer, event_id, subject, stream_seq, processed_at)
        SELECT %(consumer)s, eid::text, 'user.registered', i, ts + interval '20 ms' FROM s""",
             {"consumer": consumer})]
    defaults = {
        "players": (f"INSERT INTO {t['players']} (user_id, username, created_at) "
                    "SELECT uid, 'grown' || i, ts + interval '20 ms' FROM s", {}),
        "characters": (f"INSERT INTO {t['characters']} (user_id, name, is_active, created_at) "
                       "SELECT uid, %(name)s, true, ts + interval '20 ms' FROM s",
                       {"name": DEFAULT_CHARACTER_NAME}),
        "progression": (f"INSERT INTO {t['progression']} (user_id, level, unlocked_weapons, "
                        "unlocked_skills, created_at, updated_at) SELECT uid, 1, "
                        "%(weapons)s::jsonb, %(skills)s::jsonb, ts + interval '20 ms', "
                        "ts + interval '20 ms' FROM s",
                        {"weapons": json.dumps(list(STARTER_WEAPONS)),
                         "skills": json.dumps(list(STARTER_SKILLS))}),
        # LATERAL: a user's buildings side by side, as one handler call writes them.
        "buildings": (f"INSERT INTO {t['buildings']} (user_id, kind, level, created_at) "
                      "SELECT uid, b.kind, b.level, ts + interval '20 ms' FROM s, LATERAL "
                      "(SELECT * FROM jsonb_to_recordset(%(kinds)s::jsonb) "
                      "AS x(kind text, level int)) AS b",
                      {"kinds": json.dumps([{"kind": k, "level": lv}
                                            for k, lv in STARTER_BUILDINGS])}),
    }
    if context in defaults:
        sql, params = defaults[context]
        work.append((context, f"{series} {sql}", params))
    return work


def check_disk(n: int) -> dict:
    """Refuse a prefill the database server's disk cannot hold three times over."""
    from django.db import connections

    with connections["default"].cursor() as cursor:
        cursor.execute("SHOW data_directory")
        (data_directory,) = cursor.fetchone()
    try:
        free = shutil.disk_usage(data_directory).free
    except OSError:  # not readable from here (another user's directory, another host)
        free = shutil.disk_usage("/").free
    needed = BYTES_PER_MILLION_USERS * n / 1e6
    if free < 3 * needed:
        raise SystemExit(f"grown: a {n:,}-user prefill takes ~{needed / 1e9:.1f} GB; only "
                         f"{free / 1e9:.1f} GB free for the database server")
    return {"free_gb_before": round(free / 1e9, 1), "estimated_gb": round(needed / 1e9, 2)}


def prefill(n: int, contexts: tuple[str, ...], ordered: bool = False) -> dict:
    """Write ``n`` users' rows in every database (one thread per database); VACUUM ANALYZE;
    return the seconds each part took. ``ordered``: time-ordered user and event ids."""
    from django.conf import settings
    from django.db import connections

    # One list of statements per database, so a shared database is written by one thread.
    by_alias: dict[str, list] = {"default": statements(None, ordered=ordered)}
    for context in contexts:
        by_alias.setdefault(settings.CONTEXT_DATABASES[context], []).extend(
            statements(context, consumer=context, ordered=ordered))
    now = dt.datetime.now(dt.UTC)
    common = {"n": n, "t0": now - SPREAD - dt.timedelta(minutes=5), "step": SPREAD / n}
    seconds: dict[str, float] = {}
    errors: list[BaseException] = []

    def fill(alias: str, work: list) -> None:
        connection = connections[alias]
        try:
            with connection.cursor() as cursor:
                # A bulk load's commit need not wait for the WAL flush (this session only).
                cursor.execute("SET synchronous_commit = off")
                for label, sql, params in work:
                    started = time.monotonic()
                    cursor.execute(sql, {**common, **params})
                    seconds[label] = round(time.monotonic() - started, 1)
                started = time.monotonic()
                tables = {_tables()[label]._meta.db_table for label, _, _ in work}
                for table in sorted(tables):
                    cursor.execute(f"VACUUM ANALYZE {connection.ops.quote_name(table)}")
                seconds[f"vacuum analyze ({alias})"] = round(time.monotonic() - started, 1)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(exc)
        finally:
            connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=fill, args=item) for item in by_alias.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {"seconds": round(time.monotonic() - started, 1), "parts_seconds": seconds}


def sizes(n: int, contexts: tuple[str, ...]) -> dict:
    """Bytes of each table (heap), its indexes and its total, and of each index, per million
    users (``n`` prefilled), by database; with each B-tree's depth where pageinspect allows."""
    from django.conf import settings
    from django.db import connections

    roles = {"default": ["users", "outbox"]}
    for context in contexts:
        roles.setdefault(settings.CONTEXT_DATABASES[context], []).append("inbox")
        if context in ("players", "characters", "progression", "buildings"):
            roles[settings.CONTEXT_DATABASES[context]].append(context)
    scale = 1e6 / n
    report: dict[str, dict] = {}
    for alias, names in roles.items():
        connection = connections[alias]
        with connection.cursor() as cursor:
            try:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
                depth_known = True
            except Exception:  # noqa: BLE001 - not a superuser: depths left out
                depth_known = False
            for role in dict.fromkeys(names):
                table = _tables()[role]._meta.db_table
                cursor.execute(
                    "SELECT pg_relation_size(%s::regclass), pg_indexes_size(%s::regclass), "
                    "pg_total_relation_size(%s::regclass), "
                    "(SELECT reltuples FROM pg_class WHERE oid = %s::regclass)",
                    [table] * 4)
                heap, indexes, total, rows = cursor.fetchone()
                cursor.execute(
                    "SELECT c.relname, pg_relation_size(c.oid), am.amname FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
                    "WHERE i.indrelid = %s::regclass ORDER BY c.relname", [table])
                per_index = {}
                for name, size, method in cursor.fetchall():
                    per_index[name] = {"mb_per_million": round(size * scale / 1e6, 1)}
                    if depth_known and method == "btree":
                        cursor.execute("SELECT level FROM bt_metap(%s)", [name])
                        per_index[name]["btree_levels"] = cursor.fetchone()[0] + 1
                report[f"{alias}.{table}"] = {
                    "rows": int(rows), "table_mb_per_million": round(heap * scale / 1e6, 1),
                    "indexes_mb_per_million": round(indexes * scale / 1e6, 1),
                    "total_mb_per_million": round(total * scale / 1e6, 1),
                    "indexes": per_index,
                }
    return report


def server_counters() -> dict[str, float]:
    """The PostgreSQL server's cumulative counters that tell where a drain's time went: WAL
    volume and full-page images (cluster-wide, so other sessions count too), checkpoints and
    who wrote dirty buffers out, and the bench databases' buffer reads (from the OS, i.e. not
    in shared_buffers) and hits."""
    from django.conf import settings
    from django.db import connections

    names = sorted({db["NAME"] for db in settings.DATABASES.values()})
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
        records, fpi, wal_bytes = cursor.fetchone()
        cursor.execute("SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, "
                       "buffers_clean, buffers_backend FROM pg_stat_bgwriter")
        checkpoints, by_checkpoint, by_bgwriter, by_backends = cursor.fetchone()
        cursor.execute("SELECT sum(blks_read), sum(blks_hit) FROM pg_stat_database "
                       "WHERE datname = ANY(%s)", [names])
        read, hit = cursor.fetchone()
    return {"wal_records": records, "wal_full_page_images": fpi, "wal_bytes": float(wal_bytes),
            "checkpoints": checkpoints, "buffers_written_by_checkpoints": by_checkpoint,
            "buffers_written_by_bgwriter": by_bgwriter,
            "buffers_written_by_backends": by_backends,
            "blocks_read": int(read or 0), "blocks_hit": int(hit or 0)}

