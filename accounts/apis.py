"""The Auth Service's HTTP API: thin views over accounts.services."""

from django.contrib.auth import password_validation
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from accounts.models import User
from accounts.services import RegistrationConflict, user_register
from onboarding.contracts import UserRegistered

# Hashing a huge password costs seconds: refuse it before it gets there.
PASSWORD_MAX_LENGTH = 1024


class StrictCharField(serializers.CharField):
    """A CharField that refuses non-strings (DRF would quietly turn 123 into "123")."""

    default_error_messages = {"not_a_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


class StrictEmailField(StrictCharField, serializers.EmailField):
    pass


def user_representation(user: User) -> dict:
    """The four public fields of a user, named and formatted as in the event contract."""
    return UserRegistered(
        user_id=user.id,
        username=user.username,
        email=user.email,
        registration_timestamp=user.date_joined,
    ).to_payload()


class UserRegisterApi(APIView):
    """POST /api/auth/register — create a user; 201 with userId, username, email, timestamp."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "register"

    class InputSerializer(serializers.Serializer):
        username = StrictCharField(
            max_length=User._meta.get_field("username").max_length,
            validators=User._meta.get_field("username").validators,
        )
        email = StrictEmailField(max_length=User._meta.get_field("email").max_length)
        password = StrictCharField(
            max_length=PASSWORD_MAX_LENGTH, trim_whitespace=False, style={"input_type": "password"}
        )

        def validate(self, attrs):
            candidate = User(username=attrs["username"], email=attrs["email"])
            try:
                password_validation.validate_password(attrs["password"], user=candidate)
            except DjangoValidationError as exc:
                raise serializers.ValidationError({"password": list(exc.messages)})
            return attrs

    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            user = user_register(**serializer.validated_data)
        except RegistrationConflict as exc:
            return Response({exc.field: [exc.message]}, status=status.HTTP_400_BAD_REQUEST)
        return Response(user_representation(user), status=status.HTTP_201_CREATED)


class TokenObtainApi(ObtainAuthToken):
    """POST /api/auth/token — exchange username and password for an API token."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "token"


class MeApi(APIView):
    """GET /api/auth/me — who the token (``Authorization: Token <key>``) belongs to."""

    def get(self, request):
        return Response(user_representation(request.user))
