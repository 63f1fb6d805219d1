"""``manage.py`` with injected handler faults, for the fault tests (never used in production).

The faults wrap the registered handlers before any command looks them up; everything else —
the runner, NATS, the databases — is the real thing. Set by environment variables:

- ``FAULT_FAIL_FIRST=<consumer>:<k>``: that consumer's handler raises for the first k attempts
  at each event, then works.
- ``FAULT_FAIL_ALWAYS=<consumer>``: that consumer's handler always raises.
- ``FAULT_SLOW=<consumer>:<seconds>``: that consumer's handler sleeps before working.
- ``FAULT_LOG=<path>``: every attempt appends ``<consumer> <userId> <unix time>`` there.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings_test")


class InjectedFault(RuntimeError):
    pass


def _spec(name: str) -> tuple[str, str] | None:
    value = os.environ.get(name, "")
    return tuple(value.split(":", 1)) if ":" in value else ((value, "") if value else None)


def faulty(consumer: str, handler):
    fail_first = _spec("FAULT_FAIL_FIRST")
    fail_always = _spec("FAULT_FAIL_ALWAYS")
    slow = _spec("FAULT_SLOW")
    log_path = os.environ.get("FAULT_LOG")
    attempts: collections.Counter = collections.Counter()

    def wrapped(events):
        for event in events:
            attempts[event.user_id] += 1
            if log_path:
                with open(log_path, "a") as log:
                    log.write(f"{consumer} {event.user_id} {time.time()}\n")
        if slow and slow[0] == consumer:
            time.sleep(float(slow[1]))
        if fail_always and fail_always[0] == consumer:
            raise InjectedFault(f"injected failure in {consumer}")
        failing_first = fail_first and fail_first[0] == consumer
        for event in events:
            if failing_first and attempts[event.user_id] <= int(fail_first[1]):
                raise InjectedFault(f"injected failure {attempts[event.user_id]} in {consumer}")
        return handler(events)

    return wrapped


def main():
    import importlib

    import django

    django.setup()
    from django.apps import apps
    from django.conf import settings

    from onboarding.eventbus.registry import Subscription

    for consumer in settings.BOUNDED_CONTEXTS:  # before the registry reads SUBSCRIPTIONS
        module = importlib.import_module(f"{apps.get_app_config(consumer).name}.consumers")
        module.SUBSCRIPTIONS = [
            Subscription(s.event, faulty(consumer, s.handler)) for s in module.SUBSCRIPTIONS
        ]
    from django.core.management import execute_from_command_line

    execute_from_command_line(["manage.py", *sys.argv[1:]])


if __name__ == "__main__":
    main()
