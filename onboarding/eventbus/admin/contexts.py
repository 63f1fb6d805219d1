"""Admin pieces shared by the bounded contexts' ``admin.py``: read-only rows, copyable user ids.

A context's rows are made by its consumer from events. Edited by hand, they would silently
disagree with what the events said (and the next reconciliation), so the admin shows them
read-only unless ``ADMIN_CONTEXTS_EDITABLE`` lets superusers repair them.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.db import DatabaseError, router
from django.template.response import TemplateResponse
from django.utils.html import format_html

from onboarding.eventbus.ops.labels import unreachable

SHORT_ID_LENGTH = 8


def copyable_id(value, *, short: bool = True) -> str:
    """A user id as HTML: (the start of) it in ``<code>``, the whole id in its tooltip, and a
    button that copies the whole id (searching the admin by user id needs all of it)."""
    if value in (None, ""):
        return "-"
    full = str(value)
    return format_html(
        '<code title="{}">{}</code> <button type="button" class="copy-id" data-copy="{}" '
        'title="copy the whole id" '
        'onclick="navigator.clipboard.writeText(this.dataset.copy)">copy</button>',
        full, full[:SHORT_ID_LENGTH] if short else full, full,
    )


class SaysUnreachable:
    """For an admin page whose rows live in a context's database: the web process may not
    reach it (a service deployed apart, its database down), and then the page says so in one
    line, naming the database, with a 503; never a 500."""

    def database_alias(self, request) -> str:
        return router.db_for_read(self.model)

    def _answering(self, request, view, *args):
        try:
            response = view(request, *args)
            if hasattr(response, "render") and not response.is_rendered:
                response.render()  # the queries run here, while rendering: inside the try
            return response
        except DatabaseError as exc:
            return TemplateResponse(request, "admin/eventbus/unreachable.html", {
                **self.admin_site.each_context(request),
                "title": self.model._meta.verbose_name_plural.capitalize(),
                "said": unreachable(self.database_alias(request), exc),
            }, status=503)

    def changelist_view(self, request, extra_context=None):
        return self._answering(request, super().changelist_view, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return self._answering(request, super().change_view, object_id, form_url, extra_context)


class ContextModelAdmin(SaysUnreachable, admin.ModelAdmin):
    """A bounded context's model: read-only, except for superusers when the setting allows."""

    def _editable(self, request) -> bool:
        return bool(settings.ADMIN_CONTEXTS_EDITABLE and request.user.is_superuser)

    def has_add_permission(self, request):
        return self._editable(request) and super().has_add_permission(request)

    def has_change_permission(self, request, obj=None):
        return self._editable(request) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._editable(request) and super().has_delete_permission(request, obj)

    @admin.display(description="user", ordering="user_id")
    def short_user_id(self, obj):
        return copyable_id(obj.user_id)
