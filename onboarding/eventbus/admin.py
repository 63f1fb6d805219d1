from django.conf import settings
from django.contrib import admin, messages
from django.utils.html import format_html

from onboarding.eventbus.deadletters import dead_letters_replay
from onboarding.eventbus.models import DeadLetter, OutboxEvent, ProcessedEvent


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
        return [("yes", "Published"), ("no", "Waiting for the relay")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(published_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(published_at__isnull=True)
        return queryset


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "subject", "event_id", "created_at", "published_at", "attempts")
    list_filter = (PublishedFilter, "subject", "created_at")
    search_fields = ("=event_id", "payload")
    readonly_fields = [f.name for f in OutboxEvent._meta.fields]
    date_hierarchy = "created_at"


class ResolvedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("open", "Open"), ("resolved", "Resolved by a replay")]

    def queryset(self, request, queryset):
        if self.value() == "open":
            return queryset.filter(resolved_at__isnull=True)
        if self.value() == "resolved":
            return queryset.filter(resolved_at__isnull=False)
        return queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = (
        "id", "consumer", "stream_seq", "subject", "user_id", "error_type", "deliveries",
        "replays", "last_failed_at", "resolved_at",
    )
    list_filter = (ResolvedFilter, "consumer", "error_type", "subject", "last_failed_at")
    actions = ["replay"]
    search_fields = ("user_id", "event_id", "error_message")
    readonly_fields = [f.name for f in DeadLetter._meta.fields if f.name != "payload"] + [
        "payload_preview"
    ]
    exclude = ("payload",)

    @admin.display(description="payload")
    def payload_preview(self, obj):
        return format_html("<pre>{}</pre>", obj.payload_text[:20_000])

    def has_replay_permission(self, request):
        return request.user.is_superuser

    @admin.action(description="Replay to their consumer (only)", permissions=["replay"])
    def replay(self, request, queryset):
        letters = list(queryset.filter(resolved_at__isnull=True))
        try:
            count = dead_letters_replay(letters=letters)
        except Exception as exc:
            self.message_user(request, f"Replay failed: {exc}", messages.ERROR)
            return
        skipped = queryset.count() - len(letters)
        note = f" ({skipped} already resolved, skipped)" if skipped else ""
        self.message_user(request, f"Replayed {count} dead letter(s){note}.", messages.SUCCESS)


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
class ProcessedEventAdmin(ReadOnlyAdmin):
    list_display = ("consumer", "event_id", "subject", "stream_seq", "processed_at")
    list_filter = (ConsumerFilter,)
    search_fields = ("=event_id",)

    def get_queryset(self, request):
        consumer = request.GET.get("consumer")
        if consumer not in settings.CONTEXT_DATABASES:
            consumer = next(iter(settings.CONTEXT_DATABASES))
        alias = settings.CONTEXT_DATABASES[consumer]
        return super().get_queryset(request).using(alias).filter(consumer=consumer)
