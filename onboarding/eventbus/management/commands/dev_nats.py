import signal
import threading

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.natsserver import NatsServer, answers


class Command(BaseCommand):
    help = (
        "Development only (make run): start an embedded nats-server with JetStream on "
        "NATS_URL's port, unless a server already answers there, then provision JetStream and "
        "wait for SIGTERM/SIGINT.\n"
        "Example: manage.py dev_nats"
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--store-dir", help="JetStream store of the embedded server (default: var/nats)"
        )

    def handle(self, *args, store_dir, **options):
        url = settings.NATS_URL.split(",")[0].strip()
        server = None
        if answers(url):
            self.stdout.write(f"using the NATS server already answering at {url}")
        else:
            host_port = url.rsplit(":", 1)
            if "127.0.0.1" not in url and "localhost" not in url:
                raise CommandError(f"no NATS server answers at {url}, and it is not local")
            port = int(host_port[1]) if len(host_port) == 2 and host_port[1].isdigit() else 4222
            server = NatsServer(store_dir or settings.VAR_DIR / "nats", port=port).start()
            self.stdout.write(f"started nats-server (JetStream, store {server.store_dir}) at {url}")
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
                server.stop()
                self.stdout.write("nats-server stopped")
