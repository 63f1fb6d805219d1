"""The event bus: the one place that talks to NATS JetStream.

A bounded context needs only the names below; everything else in this package is the plumbing
(the map of its folders, and what each may import: docs/architecture.md, "The map").

- ``Subscription``, ``UserDefaults``: what a context declares in its ``consumers.py`` — the
  events it handles with which service, and which of a user's defaults it holds;
- ``PermanentError``: what a handler raises for an event that can never succeed (dead-lettered
  at once, never retried);
- ``insert_ignoring_conflicts``: the set-based, idempotent INSERT the contexts' services use
  (``unless_erased=`` skips the users the context erased);
- ``erase_users``: a context's ``user.deleted`` service: the user's rows go, a tombstone stays
  (and ``user.erased.<context>`` is announced); ``held_user_ids``: which users a context holds
  rows of (reconcile's search for orphans);
- ``outbox_publish_on_commit``: how a producer publishes an event, in its own transaction;
- ``ContextModelAdmin``: a context's rows in the admin, read-only.

The last four import models, so they load on first use (this package is imported while Django
loads its apps, before models may be).
"""

from onboarding.eventbus.consumer.failures import PermanentError
from onboarding.eventbus.registry import Subscription, UserDefaults
from onboarding.eventbus.rows import insert_ignoring_conflicts

__all__ = [
    "ContextModelAdmin",
    "PermanentError",
    "Subscription",
    "UserDefaults",
    "erase_users",
    "held_user_ids",
    "insert_ignoring_conflicts",
    "outbox_publish_on_commit",
]

_LAZY = {
    "outbox_publish_on_commit": "onboarding.eventbus.outbox.write",
    "ContextModelAdmin": "onboarding.eventbus.admin.contexts",
    "erase_users": "onboarding.eventbus.erasing",
    "held_user_ids": "onboarding.eventbus.erasing",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
