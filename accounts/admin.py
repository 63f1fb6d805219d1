from django import forms
from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.urls import NoReverseMatch, reverse

from accounts.models import User
from accounts.selectors import user_onboarding_get
from accounts.services import user_delete, user_register, user_rename, user_taken_field
from onboarding.eventbus.admin.contexts import copyable_id
from onboarding.eventbus.ops.story import UserStoryError, user_story


def _admin_url(label: str, pk) -> str | None:
    app_label, model_name = label.split(".")
    try:
        return reverse(f"admin:{app_label}_{model_name}_change", args=[pk])
    except NoReverseMatch:  # a model the admin does not show
        return None


class UserAddForm(AdminUserCreationForm):
    """The admin's Add user, with the e-mail every account has, checked as registration does."""

    def clean_email(self):
        email = User.objects.normalize_email(self.cleaned_data.get("email") or "")
        if not email:
            raise forms.ValidationError("Every account has an e-mail address.")
        if user_taken_field(username="", email=email) == "email":
            raise forms.ValidationError("A user with that email already exists.")
        return email


class UserEditForm(UserChangeForm):
    """The admin's change form, with registration's rules for a new username and e-mail:
    NFKC, unique case-insensitively (a taken name is a form error, not a failed rename)."""

    def clean_username(self):
        username = User.normalize_username(self.cleaned_data.get("username") or "")
        if user_taken_field(username=username, email=None, exclude=self.instance):
            raise forms.ValidationError("A user with that username already exists.")
        return username

    def clean_email(self):
        email = User.objects.normalize_email(self.cleaned_data.get("email") or "")
        if not email:
            raise forms.ValidationError("Every account has an e-mail address.")
        if user_taken_field(username="", email=email, exclude=self.instance) == "email":
            raise forms.ValidationError("A user with that email already exists.")
        return email


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Users, made, renamed and erased through the accounts services only, so that every
    change is announced: Add user registers (``user.registered``), a new username renames
    (``user.renamed``), Delete and the bulk delete erase (``user.deleted``)."""

    add_form = UserAddForm
    form = UserEditForm
    add_fieldsets = ((None, {"classes": ("wide",), "fields": (
        "username", "email", "usable_password", "password1", "password2")}),)
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

    def save_model(self, request, obj, form, change):
        if not change:
            user = user_register(
                username=obj.username, email=obj.email, password_hash=obj.password,
                **{name: getattr(obj, name) for name in ("first_name", "last_name",
                                                          "is_active", "is_staff",
                                                          "is_superuser")},
            )
            obj.pk, obj.username, obj.email = user.pk, user.username, user.email
            obj.date_joined = user.date_joined
            obj._state.adding, obj._state.db = False, user._state.db
            return
        renamed = "username" in form.changed_data
        if renamed:
            new_name, obj.username = obj.username, form.initial["username"]
        super().save_model(request, obj, form, change)
        if renamed:
            user_rename(user=obj, username=new_name)

    def delete_model(self, request, obj):
        user_delete(user=obj)

    def delete_queryset(self, request, queryset):
        for user in queryset:
            user_delete(user=user)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), **self._story_context(request, object_id)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _story_context(self, request, object_id) -> dict:
        """The per-user story (``onboarding_status --user``) with admin links added, and each
        service's readiness as the client reads it: accounts' projection of what the service
        announced. The story's records, inbox rows and tombstones come from each service's own
        database (the operator's credentials); one that cannot be reached says so in its row.
        """
        try:
            story = user_story(user_id=object_id)
        except UserStoryError as exc:
            return {"story_error": str(exc)}
        onboarding = user_onboarding_get(user_id=story["user_id"]) if story["user"]["exists"] \
            else None
        for name, service in story["services"].items():
            service["ready"] = bool(onboarding and onboarding.services.get(name))
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
