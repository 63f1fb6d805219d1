import signal
import subprocess
import threading
import time
from urllib.parse import urlparse

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from onboarding.dev.natsserver import NatsServer, answers
from onboarding.eventbus.nats.options import display_url

# On Ctrl-C every process of `make run` is signalled at once. Stopping the server at once would
# make the consumers, the relay and the web process log lost connections in their last second;
# they are given this long to close theirs first (they take well under a second).
STOP_GRACE_SECONDS = 2.0


class Command(BaseCommand):
    help = (
        "Development only (make run): start this checkout's embedded nats-server with JetStream "
        "(NATS_URL unset: the port of NATS_DEV_URL, data in var/nats), or use the server at "
        "NATS_URL; provision JetStream; wait for SIGTERM/SIGINT.\n"
        "Example: manage.py dev_nats"
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--store-dir", help="JetStream store of the embedded server (default: var/nats)"
        )
        parser.add_argument(
            "--stop-grace", type=float, default=STOP_GRACE_SECONDS,
            help="seconds the embedded server outlives a stop signal, so clients leave first",
        )

    def handle(self, *args, store_dir, stop_grace, **options):
        url = settings.NATS_URL.split(",")[0].strip()
        embedded = settings.NATS_URL == settings.NATS_DEV_URL
        origin = "this checkout's own" if embedded else "NATS_URL's"
        server = None
        if answers(url):
            self.stdout.write(f"nats: using {origin} server, already running at {display_url()}")
        else:
            parsed = urlparse(url)
            if parsed.hostname not in ("127.0.0.1", "localhost"):
                raise CommandError(
                    f"no NATS server answers at {display_url()}, and it is not local"
                )
            store = store_dir or settings.VAR_DIR / "nats"
            server = NatsServer(store, port=parsed.port or 4222)
            server.store_dir.mkdir(parents=True, exist_ok=True)
            log = open(server.store_dir / "nats-server.log", "ab")  # its banner is noise here
            # Its own session: honcho signals this command's whole process group, and the
            # server must outlive the clients' goodbyes (the grace below), not die with them.
            server.start(stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            where = "this checkout's own" if embedded else "an"
            self.stdout.write(
                f"nats: started {where} embedded nats-server at {url} (data and log in {store})"
            )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            call_command("setup_jetstream", wait=15, stdout=self.stdout)
            while not stop.wait(1):
                if server is not None and server.process.poll() is not None:
                    raise CommandError(f"nats-server exited with {server.process.returncode}")
        finally:
            if server is not None:
                if stop.is_set():
                    # A repeated signal (honcho sends SIGTERM after the terminal's SIGINT) must
                    # not cut the grace short.
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        signal.signal(sig, signal.SIG_IGN)
                    time.sleep(stop_grace)
                server.stop()
                self.stdout.write("nats-server stopped")
