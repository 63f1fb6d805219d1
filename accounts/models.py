import uuid

from django.contrib.auth.models import AbstractUser
from django.contrib.auth.models import UserManager as DjangoUserManager
from django.db import models
from django.db.models.functions import Lower

from onboarding.contracts import EMAIL_MAX_LENGTH


class UserManager(DjangoUserManager):
    """``create_user`` and ``create_superuser`` (``manage.py createsuperuser`` among their
    callers) make the account through the registration service, which announces it: no
    account exists that the services never heard of."""

    def _create_user(self, username, email, password, **extra_fields):
        from accounts.services import user_register  # services import this module

        if not username:
            raise ValueError("The given username must be set")
        return user_register(username=username, email=email or "", password=password,
                             **extra_fields)

    async def _acreate_user(self, username, email, password, **extra_fields):
        from asgiref.sync import sync_to_async

        return await sync_to_async(self._create_user)(username, email, password, **extra_fields)


class User(AbstractUser):
    """A user of the game. The UUID primary key is the ``userId`` every context keys on."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    email = models.EmailField("email address", max_length=EMAIL_MAX_LENGTH)

    REQUIRED_FIELDS = ["email"]

    objects = UserManager()

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            # Case-insensitive uniqueness, enforced by the database so two racing
            # registrations cannot both win ("Sam" and "sam" are one user).
            models.UniqueConstraint(Lower("username"), name="accounts_user_username_ci_unique"),
            models.UniqueConstraint(Lower("email"), name="accounts_user_email_ci_unique"),
        ]
        # The background reconcile reads the users registered since its watermark, and
        # `reconcile --since` a period: by date_joined, not a scan of the table.
        indexes = [models.Index(fields=["date_joined", "id"], name="accounts_user_joined")]


class ServiceReadiness(models.Model):
    """Accounts' projection of what each service announced it did for a user: the readiness the
    game client polls (``GET /api/auth/me/onboarding``), read here without touching any
    service's database.

    Kept by ``manage.py consume accounts`` from the services' announcements
    (``user.onboarded.<service>``, ``user.erased.<service>``), idempotent (one row per user and
    service, written with an upsert) and in order. An erasure is final: a late
    ``user.onboarded`` for an erased user does not make them ready again. Outlives the account
    (no foreign key): after a deletion it records which services erased the user. Holds no
    personal data: an id, a service's name, two times. ``reconcile`` compares it with the
    services' rows and repairs it.
    """

    user_id = models.UUIDField()
    service = models.CharField(max_length=64)
    onboarded_at = models.DateTimeField(null=True, blank=True)
    erased_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "service readiness"
        constraints = [
            models.UniqueConstraint(fields=["user_id", "service"], name="readiness_once"),
        ]

    def __str__(self):
        state = "erased" if self.erased_at else "ready" if self.onboarded_at else "waiting"
        return f"{self.service}: {state}"

    @property
    def ready(self) -> bool:
        return self.onboarded_at is not None and self.erased_at is None


class HealingWatermark(models.Model):
    """How far the background reconcile (``accounts/healing.py``) has looked, per service: every
    user registered up to ``reached`` was set up by the service, or re-delivered their
    ``user.registered``. The next pass starts there, not at the first user."""

    service = models.CharField(max_length=64, primary_key=True)
    reached = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.service}: up to {self.reached:%Y-%m-%d %H:%M:%S}"
