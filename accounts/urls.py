from django.urls import path

from accounts.apis import MeApi, TokenObtainApi, UserRegisterApi

app_name = "accounts"

urlpatterns = [
    path("register", UserRegisterApi.as_view(), name="register"),
    path("token", TokenObtainApi.as_view(), name="token"),
    path("me", MeApi.as_view(), name="me"),
]
