from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts.urls import user_urlpatterns
from onboarding.apis import HealthzApi, IndexApi, ReadyzApi

urlpatterns = [
    path("", IndexApi.as_view(), name="index"),
    path("healthz", HealthzApi.as_view(), name="healthz"),
    path("readyz", ReadyzApi.as_view(), name="readyz"),
    path("admin/", admin.site.urls),
    path("api/auth/", include("accounts.urls")),
    path("api/users/", include((user_urlpatterns, "users"))),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]

# Errors Django answers itself (an unknown URL, a crash, a refused request) in the API's one
# error shape, {"detail": ["..."]}, rather than HTML pages.
handler400 = "onboarding.exceptions.bad_request"
handler404 = "onboarding.exceptions.not_found"
handler500 = "onboarding.exceptions.server_error"
