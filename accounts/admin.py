from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.urls import NoReverseMatch, reverse

from accounts.models import User
from onboarding.eventbus.admin.contexts import copyable_id
from onboarding.eventbus.ops.story import UserStoryError, user_story


def _admin_url(label: str, pk) -> str | None:
    app_label, model_name = label.split(".")
    try:
        return reverse(f"admin:{app_label}_{model_name}_change", args=[pk])
    except NoReverseMatch:  # a model the admin does not show
        return None


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    list_display = ("username", "email", "short_user_id", "date_joined", "is_active", "is_staff")
    list_filter = ("is_active", "is_staff", "is_superuser", "date_joined")
    search_fields = ("username", "email", "=id")
    readonly_fields = ("id", "user_id", "date_joined", "last_login")
    ordering = ("-date_joined",)
    # The id first: it is the userId every service keys on, and what one searches them by.
    fieldsets = ((None, {"fields": ("user_id", "username", "password")}),
                 *DjangoUserAdmin.fieldsets[1:])

    @admin.display(description="user id")
    def user_id(self, obj):
        return copyable_id(obj.pk, short=False)

    @admin.display(description="user", ordering="id")
    def short_user_id(self, obj):
        return copyable_id(obj.pk)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), **self._story_context(request, object_id)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _story_context(self, request, object_id) -> dict:
        """The per-user story (``onboarding_status --user``) with admin links added."""
        try:
            story = user_story(user_id=object_id)
        except UserStoryError as exc:
            return {"story_error": str(exc)}
        for service in story["services"].values():
            for record in service["records"]:
                record["admin_url"] = _admin_url(record["model"], record["id"])
            for letter in service["dead_letters"]:
                letter["admin_url"] = reverse("admin:eventbus_deadletter_change",
                                              args=[letter["id"]])
                letter["replay_url"] = reverse("admin:eventbus_deadletter_replay",
                                               args=[letter["id"]])
                letter["discard_url"] = reverse("admin:eventbus_deadletter_discard",
                                                args=[letter["id"]])
        return {"story": story, "can_settle": request.user.is_superuser}
