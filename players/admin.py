from django.contrib import admin

from onboarding.eventbus import ContextModelAdmin
from players.models import Player


@admin.register(Player)
class PlayerAdmin(ContextModelAdmin):
    list_display = ("username", "short_user_id", "created_at")
    list_filter = ("created_at",)
    search_fields = ("username", "=user_id")
    readonly_fields = ("user_id", "created_at")
    date_hierarchy = "created_at"
