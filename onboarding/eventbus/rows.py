"""One statement that inserts many rows and skips those a unique constraint already holds.

The consumers' services and the inbox write a batch's rows with it instead of
``bulk_create(ignore_conflicts=True)``: the same SQL effect (``INSERT ... ON CONFLICT DO
NOTHING``), without building a model instance per row and compiling the statement per batch,
which was most of a consumer's database CPU (docs/benchmarks.md, "The drain's profile").

On PostgreSQL the rows travel as one array per column (``INSERT ... SELECT ... FROM
unnest(...)``): the statement's text is short and the same for every batch, so the driver parses
it once (psycopg re-parses a statement of more than 50 parameters on every call) and a batch's
values are sent as a handful of arrays. Elsewhere (SQLite) it is a multi-row ``VALUES`` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from django.db import connections, router
from django.utils import timezone

# Rows per statement where values are bound one by one (SQLite): 500 rows of a few columns stay
# far below every SQLite build's limit on parameters (32,766 since 3.32; 999 before, hence the
# division below).
CHUNK_ROWS = 500


def insert_ignoring_conflicts(
    model, fields: Sequence[str], rows: Sequence[Sequence], *, same: dict | None = None,
    using: str | None = None, returning: str | None = None, unless_present: str | None = None,
    unless_erased: str | None = None,
) -> list:
    """INSERT ``rows`` (tuples of the values of ``fields``) into ``model``'s table; a row that
    conflicts with any unique constraint or index is skipped, not updated, and not an error.

    ``same`` gives fields whose value is the same in every row. The model's other fields get
    their defaults (``default=``, ``auto_now``, ``auto_now_add``), evaluated once per call: a
    batch's rows share their ``created_at``. Rows are inserted in the
    order given (callers that may race on the same keys give them in one order, so that two
    transactions lock them alike). With ``returning``, the values of that field in the rows
    actually inserted; otherwise ``[]``.

    ``unless_present`` (one of ``fields``) also skips a row whose value of that field the table
    already holds in any row, whatever its constraints say: "users who have a character keep
    theirs", in the same statement instead of a read before it.

    ``unless_erased`` (a context's name) also skips a row whose ``user_id`` that context holds a
    :class:`~onboarding.eventbus.models.Tombstone` for: a user erased there is never created
    again, by an event that arrives late or twice. Also in the same statement.
    """
    if not rows:
        return []
    alias = using or router.db_for_write(model)
    connection = connections[alias]
    same = same or {}
    fields, shared = tuple(fields), tuple(same)
    if unless_present is not None and unless_present not in fields:
        raise ValueError(f"unless_present={unless_present!r} is not one of {fields}")
    if unless_erased is not None and "user_id" not in fields:
        raise ValueError(f"unless_erased needs user_id among the fields, not {fields}")
    erased = [unless_erased] if unless_erased is not None else []
    given = [model._meta.get_field(name) for name in fields]
    now = timezone.now()
    constants = [
        field.get_db_prep_save(
            same[field.name] if field.name in same
            else now if _auto_now(field) else field.get_default(), connection)
        for field in _constant_fields(model, fields, shared)
    ]
    columns = [[field.get_db_prep_save(row[i], connection) for row in rows]
               for i, field in enumerate(given)]
    inserted = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            sql = _unnest_sql(model, fields, shared, returning, unless_present,
                              unless_erased is not None, connection.alias)
            cursor.execute(sql, [*constants, *columns, *erased])
            if returning:
                inserted = [value for (value,) in cursor.fetchall()]
            return inserted
        width = len(given) + len(constants)
        chunk = max(1, min(CHUNK_ROWS, 999 // width))
        for start in range(0, len(rows), chunk):
            count = min(chunk, len(rows) - start)
            params = []
            for i in range(start, start + count):
                params += [column[i] for column in columns]
                params += constants
            cursor.execute(_values_sql(model, fields, shared, returning, unless_present,
                                       unless_erased is not None, count, connection.alias),
                           [*params, *erased])
            if returning:
                inserted += [value for (value,) in cursor.fetchall()]
    if returning:
        # SQLite returns what it stored: a UUID as its hex text, say.
        field = model._meta.get_field(returning)
        inserted = [field.to_python(value) for value in inserted]
    return inserted


def _auto_now(field) -> bool:
    return getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)


@lru_cache(maxsize=64)
def _constant_fields(model, fields: tuple[str, ...], shared: tuple[str, ...]) -> list:
    """The fields of one value for all rows: ``same``'s, then those not given that the ORM would
    fill in (the database fills the key)."""
    return [model._meta.get_field(name) for name in shared] + [
        field for field in model._meta.concrete_fields
        if field.name not in fields and field.name not in shared and not field.primary_key
        and (field.has_default() or _auto_now(field))
    ]


def _column_names(model, fields, shared, connection) -> tuple[list[str], str]:
    quote = connection.ops.quote_name
    names = [model._meta.get_field(name).column for name in fields]
    names += [field.column for field in _constant_fields(model, fields, shared)]
    return [quote(name) for name in names], quote(model._meta.db_table)


def _absent_clause(model, fields, unless_present: str | None, unless_erased: bool,
                   connection) -> str:
    """``WHERE NOT EXISTS`` a row of the table with the candidate's value of ``unless_present``,
    and (``unless_erased``) ``NOT EXISTS`` a tombstone of the candidate's user in the context
    given as the statement's last parameter; the candidate rows are ``r``, their columns ``c0``,
    ``c1``... in the order of ``fields``."""
    quote = connection.ops.quote_name
    conditions = []
    if unless_present is not None:
        table = quote(model._meta.db_table)
        column = quote(model._meta.get_field(unless_present).column)
        conditions.append(f"NOT EXISTS (SELECT 1 FROM {table} AS present "
                          f"WHERE present.{column} = r.c{fields.index(unless_present)})")
    if unless_erased:
        from onboarding.eventbus.models import Tombstone  # rows.py loads before the models

        meta = Tombstone._meta
        conditions.append(
            f"NOT EXISTS (SELECT 1 FROM {quote(meta.db_table)} AS erased "
            f"WHERE erased.{quote(meta.get_field('user_id').column)} = "
            f"r.c{fields.index('user_id')} "
            f"AND erased.{quote(meta.get_field('context').column)} = %s)"
        )
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def _returning_clause(model, returning: str | None, connection) -> str:
    if not returning:
        return ""
    return f" RETURNING {connection.ops.quote_name(model._meta.get_field(returning).column)}"


@lru_cache(maxsize=64)
def _unnest_sql(model, fields: tuple[str, ...], shared: tuple[str, ...], returning: str | None,
                unless_present: str | None, unless_erased: bool, alias: str) -> str:
    connection = connections[alias]
    columns, table = _column_names(model, fields, shared, connection)
    given = [model._meta.get_field(name) for name in fields]
    # Constants first, as scalars cast to their column's type; then one array per given field.
    selected = [f"%s::{field.db_type(connection)}"
                for field in _constant_fields(model, fields, shared)]
    arrays = [f"%s::{field.db_type(connection)}[]" for field in given]
    names = [f"c{i}" for i in range(len(given))]
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"SELECT {', '.join([*names, *selected])} "
        f"FROM unnest({', '.join(arrays)}) AS r({', '.join(names)})"
        f"{_absent_clause(model, fields, unless_present, unless_erased, connection)} "
        f"ON CONFLICT DO NOTHING{_returning_clause(model, returning, connection)}"
    )


@lru_cache(maxsize=256)
def _values_sql(model, fields: tuple[str, ...], shared: tuple[str, ...], returning: str | None,
                unless_present: str | None, unless_erased: bool, count: int, alias: str) -> str:
    connection = connections[alias]
    columns, table = _column_names(model, fields, shared, connection)
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    values = f"VALUES {', '.join([row] * count)}"
    if unless_present is not None or unless_erased:
        # The candidates as a table r(c0, c1, ...); the WHERE also settles SQLite's parsing of
        # ON CONFLICT after INSERT ... SELECT.
        names = ", ".join(f"c{i}" for i in range(len(columns)))
        values = (f"WITH r({names}) AS ({values}) SELECT * FROM r"
                  f"{_absent_clause(model, fields, unless_present, unless_erased, connection)}")
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) {values} "
        f"ON CONFLICT DO NOTHING{_returning_clause(model, returning, connection)}"
    )
