from django.contrib import admin

from buildings.models import Building


@admin.register(Building)
class BuildingAdmin(admin.ModelAdmin):
    list_display = ("kind", "level", "user_id", "created_at")
    list_filter = ("kind", "level", "created_at")
    search_fields = ("=user_id",)
    date_hierarchy = "created_at"
