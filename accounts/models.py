import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower

from onboarding.contracts import EMAIL_MAX_LENGTH


class User(AbstractUser):
    """A user of the game. The UUID primary key is the ``userId`` every context keys on."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    email = models.EmailField("email address", max_length=EMAIL_MAX_LENGTH)

    REQUIRED_FIELDS = ["email"]

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            # Case-insensitive uniqueness, enforced by the database so two racing
            # registrations cannot both win ("Sam" and "sam" are one user).
            models.UniqueConstraint(Lower("username"), name="accounts_user_username_ci_unique"),
            models.UniqueConstraint(Lower("email"), name="accounts_user_email_ci_unique"),
        ]
