"""What a process's settings say about reaching NATS, as ``nats.connect`` options.

Every process (web, relay, consumers, ``setup_jetstream``, ``deadletters replay``,
``onboarding_status``) reads *its own* settings, so each role of a deployment can run as its
own NATS user:

- ``NATS_URL``: one or several servers (comma-separated, for a cluster); a user and password
  (``nats://relay:secret@host:4222``) or a token (``nats://s3cr3t@host:4222``) may be in it. A
  server listed without credentials gets the first one's.
- ``NATS_CREDS``: a credentials file (JWT + nkey seed; operator/decentralised auth).
- ``NATS_NKEY_SEED``: an nkey seed, or the path of a file holding one.
- ``NATS_TLS_CA`` / ``NATS_TLS_CERT`` / ``NATS_TLS_KEY``: the CA that signed the servers'
  certificates, and this client's own certificate for servers that verify clients. TLS is used
  when any of them is set, when a URL is ``tls://``, or when the server requires it.
- ``NATS_INBOX_PREFIX``: where replies (PubAcks, pulled messages, API answers) come back. On a
  secured server each role gets its own prefix, so no other user may subscribe to its replies.

Settings that cannot work (an empty URL, a missing file) raise
:class:`~.refusals.NatsAccessError`, as a refusal by the server does.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from django.conf import settings

from onboarding.eventbus.nats.refusals import NatsAccessError


def server_urls() -> list[str]:
    """``NATS_URL`` as a list; a server listed without credentials gets the first one's.

    One set of credentials serves every server of a cluster (the users are the cluster's).
    """
    urls = [url.strip() for url in settings.NATS_URL.split(",") if url.strip()]
    if not urls:
        raise NatsAccessError("NATS_URL is empty")
    first = urlsplit(urls[0] if "://" in urls[0] else f"nats://{urls[0]}")
    userinfo = first.netloc.rpartition("@")[0]
    completed = []
    for url in urls:
        parts = urlsplit(url if "://" in url else f"{first.scheme}://{url}")
        if userinfo and "@" not in parts.netloc:
            parts = parts._replace(netloc=f"{userinfo}@{parts.netloc}")
        completed.append(urlunsplit(parts))
    return completed


def display_url() -> str:
    """``NATS_URL`` fit for logs and error messages: the user stays, a password or token goes."""
    shown = []
    for one in server_urls():
        parts = urlsplit(one)
        userinfo, _, host = parts.netloc.rpartition("@")
        if userinfo:
            user, has_password, _ = userinfo.partition(":")
            # A lone userinfo is a token: a secret, unlike a user name.
            host = f"{user}@{host}" if has_password else f"***@{host}"
        shown.append(urlunsplit(parts._replace(netloc=host)))
    return ",".join(shown)


def _readable(setting: str) -> str | None:
    path = getattr(settings, setting)
    if not path:
        return None
    if not Path(path).is_file():
        raise NatsAccessError(f"{setting}: no such file: {path}")
    return str(path)


def tls_context() -> ssl.SSLContext | None:
    """The client's TLS context, or None when nothing asks for TLS (the server still may)."""
    ca, cert, key = (_readable(s) for s in ("NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"))
    wants_tls = any(urlsplit(url).scheme == "tls" for url in server_urls())
    if not (ca or cert or wants_tls):
        return None
    if key and not cert:
        raise NatsAccessError("NATS_TLS_KEY is set without NATS_TLS_CERT")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise NatsAccessError(f"cannot load the NATS TLS files: {exc}") from exc
    return context


def connect_options() -> dict:
    """The ``nats.connect`` options that settings decide (servers, credentials, TLS, pings).

    A user and password (or token) in the URL are passed as options, and the servers without
    them: nats-py sends a URL's credentials to that URL only, and the servers a cluster
    advertises join the pool without any — after a failover the client would reconnect to one
    of those and be refused (seen when a cluster node was killed).
    """
    urls = server_urls()
    options: dict = {
        "servers": [_without_userinfo(url) for url in urls],
        "inbox_prefix": settings.NATS_INBOX_PREFIX,
        # A silent death noticed in seconds rather than minutes (settings.py).
        "ping_interval": settings.NATS_PING_INTERVAL,
        "max_outstanding_pings": settings.NATS_MAX_OUTSTANDING_PINGS,
    }
    parts = urlsplit(urls[0])
    if parts.username is not None:
        if parts.password is None:
            options["token"] = unquote(parts.username)
        else:
            options["user"] = unquote(parts.username)
            options["password"] = unquote(parts.password)
    context = tls_context()
    if context is not None:
        options["tls"] = context
    creds = _readable("NATS_CREDS")
    if creds:
        options["user_credentials"] = creds
    seed = settings.NATS_NKEY_SEED
    if seed:
        if Path(seed).is_file():
            options["nkeys_seed"] = str(seed)
        elif seed.startswith("S") and "/" not in seed:
            options["nkeys_seed_str"] = seed
        else:
            raise NatsAccessError(f"NATS_NKEY_SEED is neither a seed nor a file: {seed[:2]}…")
    return options


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


