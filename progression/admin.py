from django.contrib import admin

from onboarding.eventbus import ContextModelAdmin
from progression.models import MetaProgression


@admin.register(MetaProgression)
class MetaProgressionAdmin(ContextModelAdmin):
    list_display = ("short_user_id", "level", "unlocked_weapons", "unlocked_skills", "created_at")
    list_filter = ("level", "created_at")
    search_fields = ("=user_id",)
    readonly_fields = ("created_at", "updated_at")
    date_hierarchy = "created_at"
