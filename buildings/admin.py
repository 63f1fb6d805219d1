from django.contrib import admin

from buildings.models import Building
from onboarding.eventbus import ContextModelAdmin


@admin.register(Building)
class BuildingAdmin(ContextModelAdmin):
    list_display = ("kind", "level", "short_user_id", "created_at")
    list_filter = ("kind", "level", "created_at")
    search_fields = ("=user_id",)
    date_hierarchy = "created_at"
