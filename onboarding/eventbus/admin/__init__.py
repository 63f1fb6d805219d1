"""The event bus in the admin: its own rows (outbox, dead letters, inboxes), the Event flow page,
and what the bounded contexts' ``admin.py`` share (:mod:`.contexts`)."""

from onboarding.eventbus.admin import models  # noqa: F401  (registers the event bus's models)
