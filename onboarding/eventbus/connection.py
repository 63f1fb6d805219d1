"""Opening NATS connections the same way everywhere: the one place that knows how to reach NATS.

Every process (web, relay, consumers, ``setup_jetstream``, ``deadletters replay``,
``onboarding_status``) connects through :func:`connect`, with what *its own* settings say, so
each role of a deployment can run as its own NATS user:

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

Two kinds of failure are told apart, because they call for opposite answers:

- *NATS is unreachable* (down, restarting, a network cut): every connection reconnects for ever
  (``max_reconnect_attempts=-1``); a NATS restart is never fatal to a long-running process.
- *NATS refuses us* (a wrong password, a missing credentials file, a certificate that does not
  verify, a permission the server denies): retrying cannot help, and a process that retried for
  ever would look alive while doing nothing. :class:`NatsAccessError` ends the command at once,
  with one line naming the server (without its password) and what was refused.

nats-py reports each failed attempt through ``error_cb``; without one it prints to stderr, and
with a naive one a NATS outage logs twice a second, so the callback here logs a repeated error
at most once every ``_REPEAT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import nats
from django.conf import settings
from nats.aio.client import Client as NATS

logger = logging.getLogger(__name__)

_REPEAT_SECONDS = 30.0
# Before a process first connects, a server that is not listening yet is normal for this long.
_STARTUP_QUIET_SECONDS = 10.0

# What the server says when it refuses a client (lower-cased): these never heal by retrying.
# Exact phrases: "authentication timeout" (a slow handshake on a busy host) or "maximum account
# active connections exceeded" are transient, and must not end a process.
_REFUSALS = (
    "authorization violation",
    "permissions violation",
    "user authentication expired",
    "user authentication revoked",
    "account authentication expired",
)
# OpenSSL's reasons for a certificate the other side will not accept (an unknown CA, a missing
# or bad client certificate); an EOF or a reset during the handshake is transient.
_TLS_REFUSALS = ("CERTIFICATE", "UNKNOWN_CA")


class NatsAccessError(Exception):
    """NATS refused this process, or its NATS settings cannot work: retrying cannot help."""


# -- settings --------------------------------------------------------------------------------


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
    """The ``nats.connect`` options that settings decide (servers, credentials, TLS).

    A user and password (or token) in the URL are passed as options, and the servers without
    them: nats-py sends a URL's credentials to that URL only, and the servers a cluster
    advertises join the pool without any — after a failover the client would reconnect to one
    of those and be refused (seen when a cluster node was killed).
    """
    urls = server_urls()
    options: dict = {
        "servers": [_without_userinfo(url) for url in urls],
        "inbox_prefix": settings.NATS_INBOX_PREFIX,
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


# -- connecting ------------------------------------------------------------------------------


def _refusal(exc: BaseException | None) -> str | None:
    """Why the server (or TLS) refused us, or None for errors that retrying may heal."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS failed: {getattr(exc, 'verify_message', None) or exc}"
    if isinstance(exc, ssl.SSLError):
        reason = (getattr(exc, "reason", None) or "").upper()
        return f"TLS failed: {exc}" if any(r in reason for r in _TLS_REFUSALS) else None
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text:
        return "authorization violation (wrong or missing user, password, token, nkey or creds)"
    if any(refusal in text for refusal in _REFUSALS):
        message = str(exc).removeprefix("nats: ").strip("'")
        if "_inbox" in text:
            message += " (NATS_INBOX_PREFIX must be a prefix this user may subscribe to)"
        return message
    return None


def _callbacks(name: str, state: dict, refuse: Callable[[str], None]) -> dict:
    last_logged: dict[str, float] = {}
    started = time.monotonic()

    async def error_cb(exc: Exception) -> None:
        if state["closing"]:
            return  # a connection given up on (refused) or being closed: nothing to report
        reason = _refusal(exc)
        if reason is not None:
            refuse(reason)
            return
        key = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if (not state["connected"] and isinstance(exc, OSError)
                and now - started < _STARTUP_QUIET_SECONDS):
            # Processes started together with their server (make run, a deploy) find nothing
            # listening for a moment: say so once, quietly; a server still absent warns below.
            if not last_logged:
                last_logged["startup"] = now
                logger.info("nats %s: waiting for a server at %s", name, display_url())
            return
        if now - last_logged.get(key, -_REPEAT_SECONDS) >= _REPEAT_SECONDS:
            last_logged[key] = now
            logger.warning("nats %s: %s", name, key)

    async def disconnected_cb() -> None:
        if not state["closing"]:
            logger.warning("nats %s: disconnected", name)

    async def reconnected_cb() -> None:
        last_logged.clear()
        logger.info("nats %s: reconnected", name)

    async def closed_cb() -> None:
        # Reconnecting for ever, the client only closes by itself on a server error it deems
        # final (an expired JWT, say), without telling error_cb: the process can do nothing more.
        if not state["closing"]:
            last = state["nc"].last_error if state.get("nc") else None
            refuse(_refusal(last) or f"the connection was closed: {last}")

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
    }


async def connect(
    name: str, *, on_refused: Callable[[NatsAccessError], None] | None = None
) -> NATS:
    """Connect to ``settings.NATS_URL``; waits (retrying) until a server answers.

    Raises :class:`NatsAccessError` at once if the server refuses this client or the settings
    cannot work. A refusal after the connection is up (a permission denied, credentials revoked
    on reconnect) is logged once and handed to ``on_refused``, which should end the process;
    a process that passes none (the web's publisher) leaves its events to the relay.
    """
    options = connect_options()
    shown = display_url()
    state: dict = {"closing": False, "refused": None, "connected": False}
    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    def refuse(reason: str) -> None:
        error = NatsAccessError(f"NATS at {shown} refused {name}: {reason}")
        first = state["refused"] is None
        state["refused"] = error
        if not refused.done():
            refused.set_result(error)
            return  # still connecting: connect() raises it
        if on_refused is not None:
            on_refused(error)  # it ends the process, and says why
        elif first:
            logger.error("%s", error)

    nc = NATS()
    state["nc"] = nc
    connecting = asyncio.ensure_future(
        nc.connect(
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            **options,
            **_callbacks(name, state, refuse),
        )
    )
    try:
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        await _abandon(nc, state)
        raise
    if not connecting.done():
        connecting.cancel()
        await _abandon(nc, state)
        raise refused.result()
    try:
        connecting.result()
    except Exception as exc:
        reason = _refusal(exc)
        if reason is None:
            raise
        raise NatsAccessError(f"NATS at {shown} refused {name}: {reason}") from exc
    state["connected"] = True
    if not refused.done():
        refused.set_result(None)  # from now on refusals go to on_refused
    nc._onboarding_state = state  # lets close() silence the expected "disconnected"
    return nc


async def _abandon(nc: NATS, state: dict) -> None:
    state["closing"] = True
    try:
        await asyncio.wait_for(nc.close(), 2)
    except Exception:
        pass  # never connected: nothing to release


async def connect_within(name: str, timeout: float, **kwargs) -> NATS:
    """Connect, or raise ``TimeoutError`` if no server answers within ``timeout`` seconds."""
    return await asyncio.wait_for(connect(name, **kwargs), timeout)


@contextlib.asynccontextmanager
async def session(name: str, *, timeout: float):
    """A connection for a short command; a refusal ends the body at once as NatsAccessError.

    Without this, a denied JetStream request would only time out, and the command would report
    a timeout instead of what the server refused.
    """
    task = asyncio.current_task()
    nc = await connect_within(name, timeout, on_refused=lambda error: task.cancel())
    try:
        yield nc
    except BaseException:
        # Our cancel, or what became of it: a request's own wait_for turns a cancel that meets
        # its timeout into TimeoutError.
        error = nc._onboarding_state["refused"]
        if error is None:
            raise
        if task.cancelling():
            task.uncancel()  # the cancel was ours: an enclosing timeout must not see it
        raise error from None
    finally:
        await close(nc)


async def close(nc: NATS, *subscriptions) -> None:
    """Close cleanly: unsubscribe pull subscriptions first, or ``drain`` can hang 30 s."""
    getattr(nc, "_onboarding_state", {})["closing"] = True
    for sub in subscriptions:
        try:
            await sub.unsubscribe()
        except Exception:  # already gone with the connection; nothing to release
            pass
    try:
        await asyncio.wait_for(nc.flush(timeout=1), 2)
    except Exception:
        pass  # acks still buffered are lost; those messages are redelivered (and deduplicated)
    await nc.close()
