import shlex
import sys

from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.registry import get_consumers


def processes(*, python: str, web_port: int) -> dict[str, str]:
    """The development stack, process name → command: NATS, the web app, the relay and one
    consumer per registered context (so a new context app runs without editing any list)."""
    manage = f"exec {shlex.quote(python)} manage.py"
    found = {
        "nats": f"{manage} dev_nats",
        "web": f"{manage} runserver 127.0.0.1:{web_port}",
        "relay": f"{manage} outbox_relay",
    }
    for name in get_consumers():
        if name in found:
            raise CommandError(f"consumer {name!r} has the name of another process")
        found[name] = f"{manage} consume {name}"
    return found


class Command(BaseCommand):
    help = (
        "Print the Procfile of the development stack (what `make run` starts with honcho): "
        "nats, web, relay and one process per registered consumer.\n"
        "Example: manage.py procfile --without buildings > var/Procfile"
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--without", nargs="*", default=[], metavar="NAME",
            help="leave these processes out (e.g. a consumer you will run by hand)",
        )
        parser.add_argument("--web-port", type=int, default=8000)
        parser.add_argument(
            "--python", default=sys.executable, help="interpreter (default: this one)"
        )

    def handle(self, *args, without, web_port, python, **options):
        found = processes(python=python, web_port=web_port)
        # `make run WITHOUT="a b"` arrives as one argument
        names = [name for value in without for name in value.replace(",", " ").split()]
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise CommandError(
                f"no process {', '.join(unknown)}; processes: {', '.join(found)}"
            )
        for name, command in found.items():
            if name not in names:
                self.stdout.write(f"{name}: {command}")
