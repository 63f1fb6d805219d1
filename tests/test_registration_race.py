"""Racing registrations: 50 at once for one username, and 50 at once for one e-mail address in
50 spellings of its case. Exactly one wins (201); every other one gets the documented 400, not a
500; one user and one event exist.

Real concurrency: 50 threads, released together by a barrier, each on its own HTTP connection
to the app served for real (Django's live server: a threaded WSGI server, one thread and one
database connection per request), on whichever database the suite runs on (SQLite by default,
PostgreSQL with ``DATABASE_URL``). The application's pre-check lets several racers
through; the database's case-insensitive unique constraints decide, and the lost race's
``IntegrityError`` becomes the 400 (accounts.services.user_register).
"""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from django.core.servers.basehttp import ThreadedWSGIServer
from django.test.testcases import LiveServerThread, _StaticFilesHandler

from accounts.models import User
from onboarding.eventbus.models import OutboxEvent
from tests.flow import STRONG_PASSWORD

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

RACERS = 50


class RaceServerThread(LiveServerThread):
    """Django's live server with room for every racer's connection in its listen queue: with
    its default (10), connections past the queue are reset before the server accepts them."""

    class server_class(ThreadedWSGIServer):  # noqa: N801 (the attribute Django reads)
        request_queue_size = 2 * RACERS


@pytest.fixture
def race_server():
    thread = RaceServerThread("127.0.0.1", _StaticFilesHandler)
    thread.daemon = True
    thread.start()
    thread.is_ready.wait(10)
    if thread.error:
        raise thread.error
    yield f"http://127.0.0.1:{thread.port}"
    thread.terminate()


def register_all_at_once(base_url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body at the same moment, each on a connection of its own: (status, body)."""
    address = urlsplit(base_url)
    barrier = threading.Barrier(len(bodies), timeout=30)

    def register(body: dict) -> tuple[int, dict]:
        client = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        try:
            client.connect()  # connected before the barrier: the requests leave together
            barrier.wait()
            client.request("POST", "/api/auth/register", json.dumps(body),
                           {"Content-Type": "application/json"})
            response = client.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(register, bodies))


def assert_one_winner(results: list[tuple[int, dict]], field: str) -> None:
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [400] * (RACERS - 1), statuses
    losers = [body for status, body in results if status == 400]
    assert all(body == {field: [f"A user with that {field} already exists."]}
               for body in losers), losers
    assert User.objects.count() == 1
    assert OutboxEvent.objects.count() == 1


def case_spelling(text: str, n: int) -> str:
    """The n-th upper/lower-case spelling of ``text`` (bit i of n: letter i upper-case)."""
    letters = iter(range(len(text)))
    return "".join(
        char.upper() if char.isalpha() and (n >> next(letters)) & 1 else char for char in text
    )


def test_fifty_registrations_of_one_username_make_one_user(race_server):
    bodies = [{"username": "racer", "email": f"racer{i}@example.com", "password": STRONG_PASSWORD}
              for i in range(RACERS)]
    assert_one_winner(register_all_at_once(race_server, bodies), "username")
    assert User.objects.get().username == "racer"


def test_fifty_registrations_of_one_email_in_different_cases_make_one_user(race_server):
    spellings = {case_spelling("race.email@example.com", n) for n in range(RACERS)}
    assert len(spellings) == RACERS
    bodies = [{"username": f"racer{i}", "email": email, "password": STRONG_PASSWORD}
              for i, email in enumerate(sorted(spellings))]
    assert_one_winner(register_all_at_once(race_server, bodies), "email")
    assert User.objects.get().email.lower() == "race.email@example.com"
