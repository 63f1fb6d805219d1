"""NATS refusing a process, told apart from NATS being unreachable.

The two call for opposite answers:

- *NATS is unreachable* (down, restarting, a network cut): every connection reconnects for ever
  (``max_reconnect_attempts=-1``); a NATS restart is never fatal to a long-running process.
- *NATS refuses us* (a wrong password, a missing credentials file, a certificate that does not
  verify, a permission the server denies): retrying cannot help, and a process that retried for
  ever would look alive while doing nothing. :class:`NatsAccessError` ends the command at once,
  with one line naming the server (without its password) and what was refused.
"""

from __future__ import annotations

import ssl

import nats

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


def refusal_reason(exc: BaseException | None) -> str | None:
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
