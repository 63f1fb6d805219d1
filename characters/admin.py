from django.contrib import admin

from characters.models import Character


@admin.register(Character)
class CharacterAdmin(admin.ModelAdmin):
    list_display = ("name", "user_id", "is_active", "created_at")
    list_filter = ("is_active", "name", "created_at")
    search_fields = ("name", "=user_id")
    date_hierarchy = "created_at"
