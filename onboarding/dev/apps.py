from django.apps import AppConfig


class DevConfig(AppConfig):
    name = "onboarding.dev"
    label = "dev"
    verbose_name = "Development tools"
