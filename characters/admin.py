from django.contrib import admin

from characters.models import Character
from onboarding.eventbus import ContextModelAdmin


@admin.register(Character)
class CharacterAdmin(ContextModelAdmin):
    list_display = ("name", "short_user_id", "is_active", "created_at")
    list_filter = ("is_active", "name", "created_at")
    search_fields = ("name", "=user_id")
    date_hierarchy = "created_at"
