from django.contrib import admin

from plugins.auth.models import TokenPolicy


@admin.register(TokenPolicy)
class TokenPolicyAdmin(admin.ModelAdmin):
    list_display = ("name", "token_expiration", "session_expiration", "expired_token_renew_limit", "updated_at")
