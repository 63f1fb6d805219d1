import json

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from onboarding.eventbus.ops import health as flow
from onboarding.eventbus.ops.story import UserStoryError, user_story


class Command(BaseCommand):
    help = (
        "The health of the event flow: per consumer pending, ack-pending, waiting pull "
        "requests, redelivered and open dead letters; the outbox backlog and its oldest age. "
        "Exits 1 when unhealthy (for probes): NATS unreachable, a durable missing, events "
        "pending with no client pulling, open dead letters, an old unpublished outbox event, "
        "outbox events set aside after JetStream refused them.\n"
        "With --user: that user's story per service (records, inbox, durable, dead letters); "
        "exits 1 unless every service has set the user up. For a deleted user: the erasure's "
        "story (the stream's copies, and per service erased, pending behind its durable, or "
        "dead-lettered); exits 1 until the stream and every service are erased.\n"
        "Examples: manage.py onboarding_status --json\n"
        "          manage.py onboarding_status --user 0b5c3f0e-6a6d-4c3e-9a43-3f6f9b0d2a11"
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--user", metavar="USER_ID", help="one user's story instead")
        parser.add_argument(
            "--max-outbox-age", type=float, default=flow.MAX_OUTBOX_AGE,
            help="seconds an event may wait in the outbox before it counts as unhealthy "
                 "(default %(default)s)",
        )
        parser.add_argument(
            "--max-pending", type=int,
            help="pending messages per consumer that count as unhealthy even while it pulls "
                 "(default: off)",
        )
        parser.add_argument(
            "--max-dead-letters", type=int, default=flow.MAX_DEAD_LETTERS,
            help="open dead letters per consumer tolerated (default %(default)s; discarded "
                 "ones never count)",
        )
        parser.add_argument(
            "--idle-confirm", type=float, default=flow.IDLE_CONFIRM,
            help="seconds before a durable that has events pending and no client pulling is "
                 "read again to confirm it (default %(default)s; 0: trust one read)",
        )

        parser.add_argument(
            "--max-unacked-age", type=float, default=flow.MAX_UNACKED_AGE,
            help="seconds events may stay delivered but unacknowledged while no client pulls "
                 "(default %(default)s)",
        )

    def handle(self, *args, **options):
        if options["user"] is not None:
            return self._user(options["user"], options["json"])
        status = flow.onboarding_status(
            max_outbox_age=options["max_outbox_age"],
            max_pending=options["max_pending"],
            max_dead_letters=options["max_dead_letters"],
            idle_confirm=options["idle_confirm"],
            max_unacked_age=options["max_unacked_age"],
        )
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2))
        else:
            self._print(status)
        if not status["healthy"]:
            raise SystemExit(1)

    def _where(self, status):
        nats = status["nats"]
        stream = f" (stream {nats['stream']})" if nats.get("stream") else ""
        self.stdout.write(f"nats: {nats['server']}{stream}")
        for alias, label in status["databases"].items():
            self.stdout.write(f"database {alias}: {label}")

    def _print(self, status):
        self._where(status)
        columns = ("pending", "ack_pending", "waiting", "redelivered", "dead_letters")
        self.stdout.write(f"{'consumer':<14}" + "".join(f"{c:>14}" for c in columns)
                          + "  state")
        for name, entry in status["consumers"].items():
            cells = "".join(f"{entry.get(c, '?')!s:>14}" for c in columns)
            if entry["durable"] != "present":
                state = f"durable {entry['durable']}"
            elif entry.get("stalled"):
                state = "STALLED: nobody pulling"
            elif entry.get("stuck"):
                state = "STUCK: unacknowledged, nobody pulling"
            elif entry["waiting"] or entry["ack_pending"]:
                state = "pulling"
            else:
                state = "idle"
            self.stdout.write(f"{name:<14}{cells}  {state}")
        outbox = status["outbox"]
        age = outbox["oldest_age_seconds"]
        self.stdout.write(
            f"outbox backlog: {outbox['backlog']}"
            + (f" (oldest {age:.1f}s old)" if age is not None else "")
            + (f"; set aside: {outbox['set_aside']}" if outbox.get("set_aside") else "")
        )
        waiting = {name: entry["announcements"] for name, entry in status["consumers"].items()
                   if entry.get("announcements", {}).get("backlog")}
        if waiting:
            self.stdout.write("announcements waiting: " + ", ".join(
                f"{name} {a['backlog']}" + (f" (oldest {a['oldest_age_seconds']:.1f}s old)"
                                           if a["oldest_age_seconds"] is not None else "")
                for name, a in waiting.items()))
        if status["healthy"]:
            self.stdout.write(self.style.SUCCESS("healthy"))
        for problem in status["problems"]:
            self.stdout.write(self.style.ERROR(f"unhealthy: {problem}"))

    def _user(self, user_id, as_json):
        try:
            story = user_story(user_id=user_id)
        except UserStoryError as exc:
            # CommandError prints one line on stderr and exits 1.
            raise CommandError(str(exc)) from None
        except DatabaseError as exc:
            # Accounts' database (the outbox's): without it there is no story to tell. A
            # context's database that does not answer is told in the story, per service.
            said = (str(exc).strip().splitlines() or [""])[0]
            raise CommandError(f"database unreachable: {type(exc).__name__}: {said}") from None
        if as_json:
            self.stdout.write(json.dumps(story, indent=2))
        elif story["erasure"] is not None:
            self._print_erasure(story)
        else:
            self._print_story(story)
        if not story["complete"]:
            raise SystemExit(1)

    def _print_story(self, story):
        user = story["user"]
        self.stdout.write(
            f"user {story['user_id']}"
            + (f" ({user['username']})" if user["exists"] else " (no such user in accounts)")
        )
        event = story["event"]
        if event is None:
            self.stdout.write("event: none in the outbox (never announced, or published and "
                              "pruned after NATS_DUPLICATE_WINDOW)")
        else:
            published = (f"published {event['published_at']}" if event["published_at"]
                         else "NOT PUBLISHED yet (waiting in the outbox)")
            seq = (f"stream seq {event['stream_seq']} (from the {event['stream_seq_source']})"
                   if event["stream_seq"] is not None else "stream seq not known yet")
            self.stdout.write(f"event {event['event_id']} {event['subject']}: {published}; {seq}")
        self._where(story)
        if not story["nats"]["reachable"]:
            self.stdout.write(self.style.ERROR(f"nats: {story['nats']['error']}"))
        header = f"{'service':<14}{'records':<40}{'inbox':<14}{'durable':<34}dead letters"
        self.stdout.write(header)
        for name, service in story["services"].items():
            if service["error"]:
                records = "unreachable"
            elif service["missing"]:
                records = "missing"
            else:
                # Named as the admin's user page names them (ops.story._record).
                records = ", ".join(r["text"] for r in service["records"])
                if not service["complete"]:
                    records += " (incomplete)"
            inbox = f"seq {service['inbox']['stream_seq']}" if service["inbox"] else "-"
            durable = self._durable(service["durable"])
            letters = ", ".join(f"#{x['id']} {x['state']}" for x in service["dead_letters"]) or "-"
            self.stdout.write(f"{name:<14}{records[:38]:<40}{inbox:<14}{durable:<34}{letters}")
        self._details(story)
        if story["complete"]:
            self.stdout.write(self.style.SUCCESS("set up by every service"))
        else:
            self.stdout.write(self.style.ERROR("not set up by every service"))

    def _details(self, story):
        """Below the table: a database that did not answer, then each dead letter, a line each."""
        for name, service in story["services"].items():
            if service["error"]:
                self.stdout.write(self.style.ERROR(f"{name}: {service['error']}"))
        for service in story["services"].values():
            for letter in service["dead_letters"]:
                self.stdout.write(
                    f"dead letter #{letter['id']} ({letter['consumer']}, {letter['state']}, "
                    f"{letter['deliveries']} deliveries): {letter['error'][:120]}"
                )

    def _print_erasure(self, story):
        """A deleted user: the stream's copies, then per service erased or what it waits for."""
        erasure, event = story["erasure"], story["event"]
        user = story["user"]
        self.stdout.write(
            f"user {story['user_id']}: deleted (erasure requested {erasure['requested_at']}); "
            + (f"the account ({user['username']}) is still in accounts" if user["exists"]
               else "no such user in accounts")
        )
        if event["published"]:
            published = (f"published {event['published_at']}" if event["published_at"]
                         else "published (pruned from the outbox since)")
        elif event["set_aside"]:
            published = "SET ASIDE by the relay (requeue it in the admin)"
        else:
            published = "NOT PUBLISHED yet (waiting in the outbox)"
        seq = (f"stream seq {event['stream_seq']} (from the {event['stream_seq_source']})"
               if event["stream_seq"] is not None else "stream seq not known yet")
        self.stdout.write(f"event {event['event_id']} {event['subject']}: {published}; {seq}")
        stream = erasure["stream"]
        if stream["erased"]:
            self.stdout.write(f"stream: erased {stream['erased_at']} "
                              f"({stream['messages_deleted']} earlier message(s) deleted)")
        else:
            self.stdout.write(self.style.WARNING(
                "stream: pending: relay (the user's earlier messages are still in the stream)"))
        self._where(story)
        if not story["nats"]["reachable"]:
            self.stdout.write(self.style.ERROR(f"nats: {story['nats']['error']}"))
        out = event["published"]
        self.stdout.write(f"{'service':<14}{'erasure':<46}{'inbox':<14}{'durable':<34}"
                          "dead letters")
        for name, service in story["services"].items():
            state, durable = service["state"], service["durable"]
            if state == "erased":
                state = f"erased {service['erased_at']}"
            elif state == "pending":
                state = ("pending behind the relay" if not out
                         else "pending (durable unknown)" if durable is None
                         else "pending behind its durable")
            inbox = f"seq {service['inbox']['stream_seq']}" if service["inbox"] else "-"
            shown = ("-" if service["error"] else "event not published" if not out
                     else self._durable(durable, seq=event["stream_seq"]))
            letters = ", ".join(f"#{x['id']} {x['state']}" for x in service["dead_letters"]) or "-"
            self.stdout.write(f"{name:<14}{state:<45} {inbox:<14}{shown:<33} {letters}")
        for name, service in story["services"].items():
            if service["records"]:
                self.stdout.write(f"still held by {name}: "
                                  + ", ".join(r["text"] for r in service["records"]))
        self._details(story)
        if story["complete"]:
            self.stdout.write(self.style.SUCCESS("erased by every service and from the stream"))
        else:
            waiting = [f"{name} {s['state']}" for name, s in story["services"].items()
                       if s["state"] != "erased"]
            if not stream["erased"]:
                waiting.append("stream pending")
            self.stdout.write(self.style.ERROR("not erased everywhere yet: "
                                               + ", ".join(waiting)))

    @staticmethod
    def _durable(durable, seq=None):
        if durable is None:
            return "unknown (NATS)"
        floor = f"ack floor {durable['ack_floor_seq']}"
        if durable["passed"] is True:
            return f"passed ({floor})"
        if durable["passed"] is False:
            behind = f" < seq {seq}" if seq is not None else ""
            return f"not yet ({floor}{behind}, {durable['pending']} pending)"
        return f"unknown ({durable['pending']} pending)"
