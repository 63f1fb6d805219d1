"""Database routing: each bounded context's models live in that context's database.

``settings.CONTEXT_DATABASES`` maps each context app to its alias (several contexts configured
onto one physical database share one alias, see ``onboarding.databases``). Everything else —
accounts, Django's own apps, the outbox and the dead letters — lives in ``default``.

The eventbus inbox (``ProcessedEvent``), the tombstones (``Tombstone``) and the announcements
(``Announcement``) are the tables present in every context database (accounts' default among
them, since it consumes the announcements): they are written in the same transaction as the
context's own rows, so the event bus always addresses them with an explicit ``using(alias)``.
"""

from django.conf import settings

# eventbus models that exist once per context database rather than once in default.
PER_CONTEXT_MODELS = frozenset({"processedevent", "tombstone", "announcement"})


def _context_alias(app_label: str) -> str | None:
    return settings.CONTEXT_DATABASES.get(app_label)


class BoundedContextRouter:
    def db_for_read(self, model, **hints):
        return _context_alias(model._meta.app_label)

    def db_for_write(self, model, **hints):
        return _context_alias(model._meta.app_label)

    def allow_relation(self, obj1, obj2, **hints):
        # Foreign keys never cross a context's database.
        return obj1._state.db == obj2._state.db

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        alias = _context_alias(app_label)
        if alias is not None:
            return db == alias
        if app_label == "eventbus" and model_name in PER_CONTEXT_MODELS:
            return db in set(settings.CONTEXT_DATABASES.values())
        return db == "default"
