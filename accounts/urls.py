from django.urls import path

from accounts.apis import (
    LogoutApi,
    MeApi,
    MeOnboardingApi,
    TokenObtainApi,
    UserApi,
    UserOnboardingApi,
    UserRegisterApi,
)

app_name = "accounts"

urlpatterns = [
    path("register", UserRegisterApi.as_view(), name="register"),
    path("token", TokenObtainApi.as_view(), name="token"),
    path("logout", LogoutApi.as_view(), name="logout"),
    path("me", MeApi.as_view(), name="me"),
    path("me/onboarding", MeOnboardingApi.as_view(), name="me-onboarding"),
]

# Mounted at /api/users/ (onboarding/urls.py): users by id, for staff.
user_urlpatterns = [
    path("<uuid:userId>", UserApi.as_view(), name="user"),
    path("<uuid:userId>/onboarding", UserOnboardingApi.as_view(), name="user-onboarding"),
]
