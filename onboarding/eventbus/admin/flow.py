"""The admin's Event flow page, at ``/admin/eventbus/flow/`` (``admin:eventbus_flow``): each
consumer's figures and the outbox, what ``manage.py onboarding_status`` says, for people.

It is a page of the event bus, not of one of its models, so it hangs on the admin site itself
rather than under a ModelAdmin's URLs (under the dead letters' it read as one of theirs, and the
sidebar said so). The project runs Django's default site; the usual way to add a page to a site,
a subclass overriding ``get_urls``, would have to replace ``django.contrib.admin`` in
``INSTALLED_APPS``. So the default site's ``get_urls`` is wrapped here, once, with the page put
first: it stays inside ``admin.site.urls``, under the admin's namespace, and behind
``admin_view`` (login, staff) and the permission to view dead letters, as before.
"""

from __future__ import annotations

import functools

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import path

from onboarding.eventbus.models import DeadLetter
from onboarding.eventbus.ops.health import onboarding_status

# The admin index gets an "Event flow" section on top, linking to the page.
admin.site.index_template = "admin/eventbus/index.html"


def flow_view(request):
    """Each consumer's figures and the flow's health. Renders when NATS is unreachable:
    the figures NATS gives read "unreachable", the databases' still show."""
    if not admin.site.get_model_admin(DeadLetter).has_view_permission(request):
        raise PermissionDenied
    context = {
        **admin.site.each_context(request),
        "title": "Event flow",
        "status": onboarding_status(count_processed=True),
    }
    return TemplateResponse(request, "admin/eventbus/flow.html", context)


def _with_flow_page(get_urls):
    @functools.wraps(get_urls)
    def get_urls_with_flow_page():
        page = path("eventbus/flow/", admin.site.admin_view(flow_view), name="eventbus_flow")
        return [page, *get_urls()]

    get_urls_with_flow_page.adds_flow_page = True
    return get_urls_with_flow_page


if not getattr(admin.site.get_urls, "adds_flow_page", False):
    admin.site.get_urls = _with_flow_page(admin.site.get_urls)
