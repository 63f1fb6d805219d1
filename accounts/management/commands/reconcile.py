"""``manage.py reconcile``: find users who lack a service's defaults and rows of users who do not
exist (orphans), and re-deliver to repair.

The command parses, reports and draws a progress bar; what is checked and sent is
``accounts.reconcile``, which lives in accounts because accounts owns both sides of what it
compares against: the users table (the source of truth for who registered) and the
``user.registered`` event (rebuilt by the same builder registration uses).

Report mode (no ``--repair``) only reads, and exits 1 when anything is missing or orphaned: a
cron job alerts on it. ``--repair`` publishes, per (service, user) missing, the user's event on
``replay.<service>.user.registered`` (``accounts.reconcile`` says which event id and why), per
(service, user) orphaned a ``user.deleted`` on ``replay.<service>.user.deleted``, and exits 0
once JetStream has acknowledged every one; the consumers apply them asynchronously, so a report
run afterwards says whether they did. It connects to NATS only when there is something
to send, with this process's own NATS settings: in a secured deployment run it as the ``replay``
role (``deploy/nats/auth.conf``: publishes ``replay.>`` only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter
from django.utils import dateparse, timezone

from accounts.reconcile import (
    DEFAULT_CHUNK_SIZE,
    LISTED_PER_SERVICE,
    Totals,
    reconcilable_services,
    reconcile_report,
    reconcile_run,
    users_to_check,
)
from onboarding.eventbus.deadletters.redelivery import RedeliveryError
from onboarding.eventbus.nats.options import display_url
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.readiness import ServiceUnreachable

# Users named per service in the text output (--json names LISTED_PER_SERVICE).
LISTED_AS_TEXT = 10


class Progress:
    """A one-line progress bar, redrawn with ``\\r``; only on a terminal."""

    WIDTH = 30

    def __init__(self, out, total: int, repair: bool) -> None:
        self.out, self.total, self.repair, self.drawn = out, total, repair, 0

    def update(self, totals: Totals) -> None:
        share = min(totals.checked / self.total, 1.0) if self.total else 1.0
        filled = int(share * self.WIDTH)
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {totals.checked:,}/{self.total:,} "
            f"users ({share:.0%}), missing {totals.missing:,}"
            + (f", repaired {totals.repaired:,}" if self.repair else "")
            + (f", orphans {totals.orphans:,}" if totals.orphans else "")
        )
        self.out.write("\r" + line.ljust(self.drawn), ending="")
        self.out.flush()
        self.drawn = len(line)

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r" + " " * self.drawn + "\r", ending="")
            self.out.flush()


def parse_since(value: str) -> dt.datetime:
    """An ISO date (midnight) or date-time; without a zone, in ``TIME_ZONE``."""
    try:
        parsed = dateparse.parse_datetime(value)
        if parsed is None:
            day = dateparse.parse_date(value)
            parsed = dt.datetime.combine(day, dt.time()) if day else None
    except ValueError:  # well-formed but impossible, e.g. 2026-02-30
        parsed = None
    if parsed is None:
        raise CommandError(
            f"--since: not an ISO date or date-time: {value!r} "
            "(e.g. 2026-01-31, 2026-01-31T12:00, 2026-01-31T12:00:00+00:00)"
        )
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed)
    return parsed


class _HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Command(BaseCommand):
    help = (
        "Find registered users who lack a service's defaults (the accounts database is the\n"
        "source of truth) and, with --repair, re-deliver their user.registered to the services\n"
        "that lack them only. Also finds orphans, rows a service holds for users accounts does\n"
        "not know (whatever --since), and with --repair sends user.deleted for them to the\n"
        "services holding them only. Without --repair it only reports, and exits 1 when anything\n"
        "is missing or orphaned. Also how a newly added service fills its defaults for existing\n"
        "users.\n"
        "Examples:\n"
        "  manage.py reconcile                               # report; exit 1 if missing/orphans\n"
        "  manage.py reconcile --service buildings --since 2026-01-01 --json\n"
        "  manage.py reconcile --repair                      # re-deliver, erase orphans\n"
        "  manage.py reconcile --service inventory --repair  # backfill a new service"
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        # Keep the examples' lines as written.
        return super().create_parser(prog_name, subcommand, formatter_class=_HelpFormatter,
                                     **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("--service", help="only this service (default: every one)")
        parser.add_argument(
            "--since", metavar="DATE",
            help="only users registered at or after this ISO date or date-time "
                 "(no zone: TIME_ZONE); the search for orphans is not limited by it",
        )
        parser.add_argument(
            "--min-age", type=float, default=60.0, metavar="SECONDS",
            help="leave out users registered (or, for orphans, erased) less than this long ago: "
                 "their event may still be on its way (default 60)",
        )
        parser.add_argument(
            "--repair", action="store_true",
            help="re-deliver user.registered to each service that lacks a user's defaults, "
                 "and send user.deleted to each service holding an orphan",
        )
        parser.add_argument(
            "--force", action="store_true",
            help="with --repair: a fresh event id for every repair, not deduplicated by "
                 "JetStream (for defaults lost again right after a processed repair)",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
            help=f"users read and checked at a time, in accounts and in each service's "
                 f"search for orphans (default {DEFAULT_CHUNK_SIZE})",
        )

    def handle(self, *args, **options):
        services = reconcilable_services()
        service = options["service"]
        if service is not None:
            if service not in services:
                raise CommandError(
                    f"unknown service {service!r}; services: {', '.join(services)}"
                )
            services = [service]
        since = parse_since(options["since"]) if options["since"] is not None else None
        if options["min_age"] < 0:
            raise CommandError("--min-age must be 0 or more seconds")
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be at least 1")
        if options["force"] and not options["repair"]:
            raise CommandError("--force only makes sense with --repair")

        now = timezone.now()
        until = now - dt.timedelta(seconds=options["min_age"])
        repair, as_json = options["repair"], options["json"]
        totals = Totals(services)
        progress = None
        if self.stdout.isatty() and not as_json:
            total = users_to_check(since=since, until=until).count()
            progress = Progress(self.stdout, total, repair)
        try:
            reconcile_run(
                totals, since=since, until=until, chunk_size=options["chunk_size"],
                repair=repair, force=options["force"], now=now,
                on_chunk=progress.update if progress else None,
            )
        except ServiceUnreachable as exc:
            # reconcile reads every service's database: the operator's credentials, not those
            # of accounts' processes (docs/deploy.md).
            raise CommandError(f"{exc}; {totals.sent_so_far()}") from None
        except NatsAccessError as exc:
            raise CommandError(f"{exc}; {totals.sent_so_far()}") from None
        except TimeoutError:
            raise CommandError(
                f"NATS at {display_url()} did not answer; {totals.sent_so_far()}"
            ) from None
        except RedeliveryError as exc:
            extra = f" (and {exc.acked} of the failed chunk)" if exc.acked else ""
            raise CommandError(f"repair failed: {exc}; {totals.sent_so_far()}{extra}") from None
        finally:
            if progress:
                progress.clear()

        report = reconcile_report(totals, since=since, until=until, min_age=options["min_age"],
                                  repair=repair)
        if as_json:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print(report, totals)
        if not repair and (totals.missing or totals.orphans or totals.stale):
            raise SystemExit(1)

    # -- output ------------------------------------------------------------------------------

    def _print(self, report: dict, totals: Totals) -> None:
        repair = report["repair"]
        scope = f"from {report['since']} " if report["since"] else ""
        self.stdout.write(
            f"reconcile: checked {report['checked']} user(s) registered {scope}up to "
            f"{report['until']} (--min-age {report['min_age']:g}s) against "
            f"{len(report['services'])} service(s)"
        )
        header = ["service", "checked", "missing"]
        if repair:
            header += ["repaired", "already sent"]
        header += ["held", "orphans"] + (["erased"] if repair else [])
        rows = [
            [name, str(s["checked"]), str(s["missing"])]
            + ([str(s["repaired"]), str(s["already_sent"])] if repair else [])
            # A service that declares no USERS selector is not searched: "-".
            + ([str(s["held"]), str(s["orphans"])] if s["held"] is not None else ["-", "-"])
            + ([str(s["erased"])] if repair else [])
            for name, s in report["services"].items()
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                            strict=True)]
            self.stdout.write("  ".join(cells))
        for name, s in report["services"].items():
            if not s["missing"]:
                continue
            self.stdout.write(f"{name}: missing for {s['missing']} user(s):")
            for user in s["missing_users"][:LISTED_AS_TEXT]:
                self.stdout.write(f"  {user['userId']} ({user['username']})")
            more = s["missing"] - min(len(s["missing_users"]), LISTED_AS_TEXT)
            if more:
                self.stdout.write(
                    f"  … and {more} more (--json lists {LISTED_PER_SERVICE} per service)"
                )
        for name, s in report["services"].items():
            if not s["orphans"]:
                continue
            self.stdout.write(
                f"{name}: orphan rows of {s['orphans']} user(s) accounts does not know:"
            )
            for user in s["orphan_users"][:LISTED_AS_TEXT]:
                self.stdout.write(f"  {user['userId']}")
            more = s["orphans"] - min(len(s["orphan_users"]), LISTED_AS_TEXT)
            if more:
                self.stdout.write(
                    f"  … and {more} more (--json lists {LISTED_PER_SERVICE} per service)"
                )
        missing = ", ".join(
            f"{name} {s['missing']}" for name, s in report["services"].items() if s["missing"]
        )
        orphans = ", ".join(
            f"{name} {s['orphans']}" for name, s in report["services"].items() if s["orphans"]
        )
        stale = ", ".join(
            f"{name} {s['projection_stale']}" for name, s in report["services"].items()
            if s["projection_stale"]
        )
        if not totals.missing and not totals.orphans and not totals.stale:
            self.stdout.write(self.style.SUCCESS(
                "nothing missing, no orphans" + (": nothing sent" if repair else "")
            ))
        if totals.stale and not repair:
            self.stdout.write(self.style.ERROR(
                f"readiness projection out of step with the services' rows: {stale}. "
                "`manage.py reconcile --repair` sets it to what the rows say"
            ))
        elif totals.stale:
            self.stdout.write(self.style.SUCCESS(
                f"readiness projection out of step with the services' rows: {stale}. Set to "
                "what the rows say"
            ))
        if totals.missing and not repair:
            self.stdout.write(self.style.ERROR(
                f"missing defaults: {missing}. `manage.py reconcile --repair` re-delivers "
                "user.registered to those services only"
            ))
        elif totals.missing:
            self.stdout.write(self.style.SUCCESS(
                f"missing defaults: {missing}. Re-delivered {totals.repaired} event(s) to those "
                "services only"
                + (f"; {totals.already_sent} already in the stream from an earlier run in the "
                   "duplicate window, not sent again" if totals.already_sent else "")
                + ". `manage.py reconcile` tells once the consumers have caught up"
            ))
        if totals.orphans and not repair:
            self.stdout.write(self.style.ERROR(
                f"orphans: {orphans}. `manage.py reconcile --repair` sends user.deleted to "
                "those services only"
            ))
        elif totals.orphans:
            self.stdout.write(self.style.SUCCESS(
                f"orphans: {orphans}. Sent user.deleted for them ({totals.erased} event(s)) to "
                "those services only; their tombstones keep them gone. `manage.py reconcile` "
                "tells once the consumers have caught up"
            ))
