"""The operator's admin and the API docs in a real browser: Debian's chromium, driven by
Playwright, against the app served for real (pytest-django's ``live_server``: a threaded WSGI
server with the static files handler, so the admin's CSS/JS and Swagger UI's files load), with
the relay and the consumers running.

Playwright's own browser download does not work on these machines: the test drives the system
binary (``.ci/run`` installs it) and is skipped, saying so, where it is absent.

Playwright's sync API keeps an event loop running on the test's thread while it is in use, and
Django's ORM refuses to run where a loop runs (``SynchronousOnlyOperation``), as does the suite's
``asyncio.run``: what the test reads or writes in the databases while the browser is open runs
on a thread of its own (``OffLoop``).
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

from conftest import wait_settled, wait_until
from onboarding.eventbus.registry import get_services
from tests.flow import STRONG_PASSWORD

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these, chromium calls home at start; this machine's network refuses it.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 15_000  # every browser wait is bounded by this

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run "
        "does) to run the browser test",
    ),
]


class OffLoop:
    """Run database (and NATS) work on one thread of its own, away from Playwright's loop."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-orm")

    def __call__(self, fn, *args, **kwargs):
        return self.executor.submit(fn, *args, **kwargs).result()

    def close(self):
        from django.db import connections

        self(connections.close_all)  # before the test databases are flushed or dropped
        self.executor.shutdown()


@pytest.fixture
def off_loop():
    runner = OffLoop()
    yield runner
    runner.close()


def register_over_http(base_url: str, username: str) -> str:
    body = json.dumps({"username": username, "email": f"{username}@example.com",
                       "password": STRONG_PASSWORD}).encode()
    request = urllib.request.Request(f"{base_url}/api/auth/register", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        return json.loads(response.read())["userId"]


def all_ready(user_id: str) -> bool:
    """Every service set the user up, as the client reads it (accounts' projection)."""
    from accounts.selectors import user_onboarding_get

    return user_onboarding_get(user_id=uuid.UUID(user_id)).complete


def a_dead_letter(user_id: str, consumer: str):
    """A dead letter of ``consumer`` carrying the user's real event, as the consumer stores one
    when handling fails (here the event had been handled: the replay is a duplicate that its
    inbox recognises, and still resolves the dead letter)."""
    from onboarding.eventbus.deadletters.store import dead_letter_store
    from onboarding.eventbus.models import OutboxEvent, ProcessedEvent

    event = OutboxEvent.objects.get(payload__contains=user_id)
    seq = (ProcessedEvent.objects.using(get_services()[consumer].database)
           .get(consumer=consumer, event_id=event.event_id).stream_seq)
    return dead_letter_store(
        consumer=consumer, subject=event.subject, stream=settings.NATS_STREAM, stream_seq=seq,
        event_id=str(event.event_id), payload=event.payload.encode(), headers={}, deliveries=4,
        error=RuntimeError("warehouse exploded"),
    )


def resolved(letter_id: int) -> bool:
    from onboarding.eventbus.models import DeadLetter

    return DeadLetter.objects.get(id=letter_id).resolved_at is not None


@contextmanager
def admin_in_chromium(base_url: str):
    """Chromium logged into the admin as ``admin``/``pw`` (which the test creates): its page."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.set_default_navigation_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(f"{base_url}/admin/")
            page.fill("#id_username", "admin")
            page.fill("#id_password", "pw")
            page.click("input[type=submit]")
            expect(page.locator("#user-tools")).to_contain_text("admin")
            yield page
        finally:
            browser.close()


def assert_story_first_without_empty_bands(page):
    """The user's page: the onboarding story inside the page's content, before the form (its
    fieldsets, the permission pickers, Save), and no heading or fieldset drawn as an empty band:
    each says something, and a heading is one line high."""
    story = page.evaluate("""() => {
      const story = document.getElementById('onboarding-story');
      const form = document.getElementById('user_form');
      return {inContentMain: !!story.closest('#content-main'),
              beforeForm: !!(story.compareDocumentPosition(form)
                             & Node.DOCUMENT_POSITION_FOLLOWING),
              bottom: story.getBoundingClientRect().bottom,
              formTop: form.getBoundingClientRect().top};
    }""")
    assert story["inContentMain"] and story["beforeForm"], story
    assert story["bottom"] <= story["formTop"], story  # drawn above the form, not behind it
    boxes = page.evaluate("""() => [...document.querySelectorAll(
        '#content h1, #content h2, #content fieldset')].map(e => ({
      tag: e.tagName, id: e.id, text: e.textContent.trim().slice(0, 60),
      height: e.getBoundingClientRect().height}))""")
    assert [box["tag"] for box in boxes].count("FIELDSET") >= 4, boxes
    for box in boxes:
        assert box["text"], f"an empty {box['tag']}: {box}"
        if box["tag"] == "H2":
            assert box["height"] < 50, f"a heading drawn as a band {box['height']}px high: {box}"


def test_operator_in_the_browser(live_server, start_consumers, django_user_model, off_loop,
                                 tmp_path):
    from playwright.sync_api import expect

    start_consumers()
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    user_id = register_over_http(live_server.url, "ada")
    wait_until(lambda: all_ready(user_id), timeout=20, message="the user's four defaults")
    wait_settled(timeout=20)
    services = list(get_services())  # the registry decides which services there are
    user_page = f"{live_server.url}/admin/accounts/user/{user_id}/change/"

    with admin_in_chromium(live_server.url) as page:
        static = []  # (status, url) of every static file the pages load
        page.on("response", lambda r: static.append((r.status, r.url))
                if "/static/" in r.url else None)

        # The freshly registered user's page: each service ready, with links to its records.
        page.goto(user_page)
        story = page.locator("#onboarding-story")
        expect(story).to_be_visible()
        expect(story.locator("tr[data-service]")).to_have_count(len(services))
        for name in services:
            row = story.locator(f'tr[data-service="{name}"]')
            expect(row).to_have_attribute("data-complete", "true")
            expect(row).to_have_attribute("data-ready", "true")
            expect(row).to_contain_text("passed")
            expect(row.locator("a[data-record]").first).to_be_visible()
            expect(row).not_to_contain_text("missing")
        page.screenshot(path=tmp_path / "user-admin.png", full_page=True)
        assert_story_first_without_empty_bands(page)
        # A record is named as `onboarding_status --user` names it: its own text, here the
        # progression's level, not the user's id again.
        progression = story.locator('tr[data-service="progression"] a[data-record]')
        expect(progression).to_have_text("meta progression level 1")

        # Follow one service's link: its record's (read-only) page, about this user.
        link = story.locator(f'tr[data-service="{services[0]}"] a[data-record]').first
        href = link.get_attribute("href")
        link.click()
        page.wait_for_url(f"{live_server.url}{href}")
        expect(page.locator("#content-main")).to_contain_text(user_id)

        # A dead letter for the user: its Replay button sends it to that consumer only, and
        # the consumer's processing of the replay resolves it.
        consumer = services[-1]
        letter = off_loop(a_dead_letter, user_id, consumer)
        page.goto(user_page)
        entry = story.locator(f'tr[data-service="{consumer}"] [data-dead-letter="{letter.id}"]')
        expect(entry).to_have_attribute("data-state", "open")
        page.screenshot(path=tmp_path / "user-admin-dead-letter.png", full_page=True)
        entry.locator('input[data-action="replay"]').click()
        page.wait_for_url(user_page)
        expect(page.locator(".messagelist .success")).to_contain_text(
            f"Replayed dead letter #{letter.id} to {consumer}")
        off_loop(wait_until, lambda: resolved(letter.id), timeout=15,
                 message="the replayed dead letter resolved")
        page.reload()
        expect(entry).to_have_attribute("data-state", "resolved")
        expect(entry.locator('input[data-action="replay"]')).to_have_count(0)
        off_loop(wait_settled, timeout=15)

        # The API docs: Swagger UI (served from drf-spectacular-sidecar) renders the schema.
        page.goto(f"{live_server.url}/api/docs/")
        register = page.locator(
            '.opblock-post:has(.opblock-summary-path[data-path="/api/auth/register"])')
        expect(register).to_be_visible()
        expect(register.locator(".opblock-summary-method")).to_have_text("POST")

        # The admin's and Swagger UI's own files were served, none missing.
        assert any("/static/admin/" in url for _, url in static)
        assert any("/static/drf_spectacular_sidecar/" in url for _, url in static)
        assert [(status, url) for status, url in static if status >= 400] == []


def register_quietly(username: str) -> None:
    """A registration whose event stays in the outbox: no relay runs in the test that calls it,
    so nothing publishes it."""
    from accounts.services import user_register

    user_register(username=username, email=f"{username}@example.com", password=STRONG_PASSWORD)


def test_event_flow_page_in_the_browser(live_server, jetstream, django_user_model, off_loop,
                                        tmp_path):
    from playwright.sync_api import expect

    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    # Every account is announced, the admin's too: with no relay in this test, mark that one
    # published, as a relay would have, so the page starts from an empty outbox.
    from django.utils import timezone

    from onboarding.eventbus.models import OutboxEvent

    assert OutboxEvent.objects.filter(published_at__isnull=True).update(
        published_at=timezone.now()) == 1
    flow_url = f"{live_server.url}/admin/eventbus/flow/"

    with admin_in_chromium(live_server.url) as page:
        # From the admin index to a page of its own, under the event bus, with no model of the
        # sidebar highlighted (the dead letters were, when it lived under them).
        page.locator("#event-flow caption a").click()
        page.wait_for_url(flow_url)
        expect(page).to_have_title("Event flow | Django site admin")
        expect(page.locator(".breadcrumbs")).to_have_text("Home › Event bus › Event flow")
        expect(page.locator("#nav-sidebar tr.model-deadletter")).to_be_visible()
        expect(page.locator("#nav-sidebar .current-model")).to_have_count(0)

        # An empty outbox does not read as something stuck.
        outbox = page.locator("#flow-outbox")
        expect(outbox).to_have_text("Outbox: nothing waiting to be published.")
        # The consumers' "waiting" column says what it counts.
        waiting = page.locator('#flow-consumers th[data-column="waiting"]')
        expect(waiting).to_have_attribute("title", re.compile("open pull requests"))
        legend = page.locator("#flow-legend")
        expect(legend).to_contain_text("waiting: pull requests open on the durable")
        expect(legend).to_contain_text("a consumer process is pulling")
        page.screenshot(path=tmp_path / "event-flow.png", full_page=True)

        # Events that do wait are counted, with the oldest's age and a link to them.
        off_loop(register_quietly, "waits1")
        off_loop(register_quietly, "waits2")
        page.reload()
        expect(outbox).to_contain_text(
            re.compile(r"^Outbox: 2 events waiting for the relay, the oldest [0-9.]+ s old\."))
        outbox.get_by_role("link", name="2 events").click()
        page.wait_for_url(re.compile(r"/admin/eventbus/outboxevent/\?published=no$"))
        expect(page.locator("#result_list tbody tr")).to_have_count(2)
        page.go_back()
        page.screenshot(path=tmp_path / "event-flow-waiting.png", full_page=True)

        # The old address (bookmarks, older notes) leads to the page.
        page.goto(f"{live_server.url}/admin/eventbus/deadletter/flow/")
        page.wait_for_url(flow_url)
