from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.generic import RedirectView

from onboarding.eventbus.admin.contexts import SaysUnreachable, copyable_id
from onboarding.eventbus.deadletters.replay import dead_letters_replay
from onboarding.eventbus.deadletters.store import dead_letter_state, dead_letters_discard
from onboarding.eventbus.models import (
    DEAD_LETTER_DATABASE,
    OUTBOX_DATABASE,
    DeadLetter,
    Erasure,
    OutboxEvent,
    ProcessedEvent,
)
from onboarding.eventbus.ops.story import UserStoryError, user_story
from onboarding.eventbus.outbox.store import outbox_requeue


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the event plumbing: to be looked at, never edited by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PublishedFilter(admin.SimpleListFilter):
    title = "published"
    parameter_name = "published"

    def lookups(self, request, model_admin):
        return [("yes", "Published"), ("no", "Waiting for the relay"),
                ("set_aside", "Set aside: refused, waiting for an operator")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(published_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(published_at__isnull=True, set_aside_at__isnull=True)
        if self.value() == "set_aside":
            return queryset.filter(published_at__isnull=True, set_aside_at__isnull=False)
        return queryset


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "subject", "event_id", "created_at", "published_at", "attempts",
                    "set_aside_at", "short_error")
    list_filter = (PublishedFilter, "subject", "created_at")
    actions = ["requeue"]
    search_fields = ("=event_id", "payload")
    readonly_fields = [f.name for f in OutboxEvent._meta.fields]
    date_hierarchy = "created_at"

    @admin.display(description="last error")
    def short_error(self, obj):
        return obj.last_error[:120]

    def has_requeue_permission(self, request):
        return request.user.is_superuser

    @admin.action(description="Requeue: the relay tries them again (clears set aside, attempts)",
                  permissions=["requeue"])
    def requeue(self, request, queryset):
        count = outbox_requeue(row_ids=list(queryset.values_list("id", flat=True)))
        skipped = queryset.count() - count
        note = f" ({skipped} not set aside, left as they are)" if skipped else ""
        self.message_user(request, f"Requeued {count} outbox event(s){note}.", messages.SUCCESS)


class ResolvedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("resolved", "Resolved by a replay"),
                ("discarded", "Discarded")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(resolved_at__isnull=True, discarded_at__isnull=True)
        if self.value() == "resolved":
            return queryset.filter(resolved_at__isnull=False)
        if self.value() == "discarded":
            return queryset.filter(discarded_at__isnull=False)
        return queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = (
        "id", "consumer", "stream_seq", "subject", "short_user_id", "error_type", "deliveries",
        "replays", "last_failed_at", "state",
    )
    list_filter = (ResolvedFilter, "consumer", "error_type", "subject", "last_failed_at")
    actions = ["replay", "discard"]
    search_fields = ("user_id", "event_id", "error_message")
    readonly_fields = [f.name for f in DeadLetter._meta.fields if f.name != "payload"] + [
        "payload_preview"
    ]
    exclude = ("payload",)

    @admin.display(description="payload")
    def payload_preview(self, obj):
        return format_html("<pre>{}</pre>", obj.payload_text[:20_000])

    @admin.display(description="user", ordering="user_id")
    def short_user_id(self, obj):
        return copyable_id(obj.user_id)

    @admin.display(description="state")
    def state(self, obj):
        return dead_letter_state(obj)

    def has_replay_permission(self, request):
        return request.user.is_superuser

    def has_discard_permission(self, request):
        return request.user.is_superuser

    @admin.action(description="Replay to their consumer (only)", permissions=["replay"])
    def replay(self, request, queryset):
        letters = list(queryset.filter(resolved_at__isnull=True, discarded_at__isnull=True))
        try:
            count = dead_letters_replay(letters=letters)
        except Exception as exc:
            self.message_user(request, f"Replay failed: {exc}", messages.ERROR)
            return
        skipped = queryset.count() - len(letters)
        note = f" ({skipped} resolved or discarded, skipped)" if skipped else ""
        self.message_user(request, f"Replayed {count} dead letter(s){note}.", messages.SUCCESS)

    @admin.action(
        description="Discard: no replay can fix them (kept, out of the health check)",
        permissions=["discard"],
    )
    def discard(self, request, queryset):
        count = dead_letters_discard(
            letters=list(queryset), by=request.user.get_username(), reason="discarded in the admin"
        )
        self.message_user(request, f"Discarded {count} dead letter(s).", messages.SUCCESS)

    # -- one dead letter at a time (the buttons on a user's page) ------------------------------

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            # The Event flow page's address until it got its own (admin/flow.py).
            path("flow/", RedirectView.as_view(pattern_name="admin:eventbus_flow",
                                               permanent=True)),
            path("<int:letter_id>/replay/", view(self.replay_view),
                 name="eventbus_deadletter_replay"),
            path("<int:letter_id>/discard/", view(self.discard_view),
                 name="eventbus_deadletter_discard"),
            *super().get_urls(),
        ]

    def _one_letter(self, request, letter_id, permission):
        if request.method != "POST":
            return None, HttpResponseNotAllowed(["POST"])
        if not permission(request):
            raise PermissionDenied
        letter = get_object_or_404(DeadLetter.objects.using(DEAD_LETTER_DATABASE), id=letter_id)
        return letter, None

    def _back(self, request, letter):
        target = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            target = reverse("admin:eventbus_deadletter_change", args=[letter.id])
        return HttpResponseRedirect(target)

    def replay_view(self, request, letter_id):
        letter, refused = self._one_letter(request, letter_id, self.has_replay_permission)
        if refused:
            return refused
        if dead_letter_state(letter) != "open":
            self.message_user(request, f"Dead letter #{letter.id} is {dead_letter_state(letter)}"
                              ": nothing to replay.", messages.WARNING)
            return self._back(request, letter)
        try:
            dead_letters_replay(letters=[letter])
        except Exception as exc:
            self.message_user(request, f"Replay failed: {exc}", messages.ERROR)
        else:
            self.message_user(request, f"Replayed dead letter #{letter.id} to {letter.consumer}.",
                              messages.SUCCESS)
        return self._back(request, letter)

    def discard_view(self, request, letter_id):
        letter, refused = self._one_letter(request, letter_id, self.has_discard_permission)
        if refused:
            return refused
        count = dead_letters_discard(
            letters=[letter], by=request.user.get_username(),
            reason=request.POST.get("reason", "")[:2000] or "discarded in the admin",
        )
        if count:
            self.message_user(request, f"Discarded dead letter #{letter.id}.", messages.SUCCESS)
        else:
            self.message_user(request, f"Dead letter #{letter.id} is {dead_letter_state(letter)}"
                              ": left as it is.", messages.WARNING)
        return self._back(request, letter)


class ConsumerFilter(admin.SimpleListFilter):
    """Pick a consumer; its inbox lives in that context's own database."""

    title = "consumer"
    parameter_name = "consumer"

    def lookups(self, request, model_admin):
        return [(name, name) for name in settings.CONTEXT_DATABASES]

    def choices(self, changelist):
        # No "All": the inboxes may sit in different databases.
        selected = self.value() or next(iter(settings.CONTEXT_DATABASES))
        for value, label in self.lookup_choices:
            yield {
                "selected": selected == value,
                "query_string": changelist.get_query_string({self.parameter_name: value}),
                "display": label,
            }

    def queryset(self, request, queryset):
        return queryset  # applied in ProcessedEventAdmin.get_queryset, with the database


@admin.register(ProcessedEvent)
class ProcessedEventAdmin(SaysUnreachable, ReadOnlyAdmin):
    list_display = ("consumer", "event_id", "subject", "stream_seq", "processed_at")
    list_filter = (ConsumerFilter,)
    search_fields = ("=event_id",)

    @staticmethod
    def _consumer(request) -> str:
        consumer = request.GET.get("consumer")
        return consumer if consumer in settings.CONTEXT_DATABASES else next(
            iter(settings.CONTEXT_DATABASES))

    def database_alias(self, request) -> str:
        return settings.CONTEXT_DATABASES[self._consumer(request)]

    def get_queryset(self, request):
        consumer = self._consumer(request)
        return (super().get_queryset(request).using(settings.CONTEXT_DATABASES[consumer])
                .filter(consumer=consumer))


class StreamErasedFilter(admin.SimpleListFilter):
    title = "stream"
    parameter_name = "stream"

    def lookups(self, request, model_admin):
        return [("erased", "Erased from the stream"), ("pending", "Waiting for the relay")]

    def queryset(self, request, queryset):
        if self.value() == "erased":
            return queryset.filter(stream_erased_at__isnull=False)
        if self.value() == "pending":
            return queryset.filter(stream_erased_at__isnull=True)
        return queryset


def _change_url(label: str, pk) -> str | None:
    app_label, model_name = label.split(".")
    try:
        return reverse(f"admin:{app_label}_{model_name}_change", args=[pk])
    except NoReverseMatch:  # a model the admin does not show
        return None


@admin.register(Erasure)
class ErasureAdmin(ReadOnlyAdmin):
    """Deleted users. Their accounts row is gone, so the accounts user page cannot tell their
    erasure: each row's page does, per service (``onboarding_status --user``'s story: erased,
    or pending behind its durable, or dead-lettered). Read-only: ``user_delete`` writes them and
    the relay completes them."""

    list_display = ("user_id", "requested_at", "stream_erased", "stream_erased_at",
                    "messages_deleted")
    list_filter = (StreamErasedFilter, "requested_at")
    search_fields = ("=key",)  # the whole user id: the key is unique, so indexed
    readonly_fields = [f.name for f in Erasure._meta.fields]
    date_hierarchy = "requested_at"

    @admin.display(description="user id", ordering="key")
    def user_id(self, obj):
        return obj.key

    @admin.display(description="stream erased", boolean=True, ordering="stream_erased_at")
    def stream_erased(self, obj):
        return obj.stream_erased_at is not None

    def change_view(self, request, object_id, form_url="", extra_context=None):
        erasure = self.get_object(request, unquote(object_id))
        # Told only to whom may see the page (the admin refuses the others next), and only for
        # a row that exists (the admin says so of the others).
        if erasure is not None and self.has_view_or_change_permission(request, erasure):
            extra_context = {**(extra_context or {}), **self._story_context(erasure)}
        return super().change_view(request, object_id, form_url, extra_context)

    @staticmethod
    def _story_context(erasure) -> dict:
        """The user's erasure story, as ``onboarding_status --user`` tells it, with links to
        what it names in the admin (records a service still holds, dead letters)."""
        try:
            story = user_story(user_id=erasure.key)
        except UserStoryError as exc:
            return {"story_error": str(exc)}
        for service in story["services"].values():
            for record in service["records"]:
                record["admin_url"] = _change_url(record["model"], record["id"])
            for letter in service["dead_letters"]:
                letter["admin_url"] = reverse("admin:eventbus_deadletter_change",
                                              args=[letter["id"]])
        return {"story": story, "copyable_user_id": copyable_id(erasure.key, short=False)}

    def get_queryset(self, request):
        return super().get_queryset(request).using(OUTBOX_DATABASE)
