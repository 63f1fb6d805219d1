"""The event bus in the admin: its own rows (outbox, dead letters, inboxes), the Event flow
page (:mod:`.flow`), and what the bounded contexts' ``admin.py`` share (:mod:`.contexts`)."""

from onboarding.eventbus.admin import flow, models  # noqa: F401  (register the pages and models)
