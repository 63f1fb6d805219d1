"""The Auth Service's HTTP API: thin views over accounts.services and accounts.selectors.

Errors are raised, never built here: onboarding.exceptions gives every one the documented shape
(``{"<field>": ["<problem>", ...]}``), and each view's ``extend_schema`` lists what it answers.
"""

from django.contrib.auth import password_validation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import MaxLengthValidator
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from accounts.authentication import ExpiringTokenAuthentication
from accounts.models import User
from accounts.selectors import UserOnboarding, token_expires_at, user_onboarding_get
from accounts.services import (
    RegistrationConflict,
    user_authenticate,
    user_delete,
    user_register,
    user_rename,
    user_token_get_or_create,
    user_token_revoke,
)
from accounts.throttles import UsernameRateThrottle
from onboarding.contracts import UserRegistered
from onboarding.openapi import RETRY_AFTER, error_response, error_serializer

# The errors several endpoints share; each body is {"detail": ["<problem>"]}.
TOO_LARGE = error_response("The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE.")
UNSUPPORTED = error_response("The body is not application/json.")
THROTTLED = error_response("Too many requests from this address; see Retry-After.")
UNAUTHENTICATED = error_response(
    "No valid `Authorization: Token <token>` header: none, an unknown or revoked token, or an "
    "expired one (older than AUTH_TOKEN_TTL; log in again)."
)

# Request examples (Swagger UI shows them; the fuzzer in tests/test_fuzz_api.py sends them too).
EXAMPLE_PASSWORD = "correct-horse-battery"
REGISTER_EXAMPLE = OpenApiExample(
    "register", request_only=True,
    value={"username": "sam", "email": "sam@example.com", "password": EXAMPLE_PASSWORD},
)
TOKEN_EXAMPLE = OpenApiExample(
    "log in", request_only=True, value={"username": "sam", "password": EXAMPLE_PASSWORD},
)

# Hashing a huge password costs seconds: refuse it before it gets there.
PASSWORD_MAX_LENGTH = 1024


class StrictCharField(serializers.CharField):
    """A CharField that refuses non-strings (DRF would quietly turn 123 into "123")."""

    default_error_messages = {"not_a_string": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        # One message per problem: a value that is too long fails on its length alone, before
        # the validators (a username's format, an email's pattern) complain about the same
        # value again — and before they scan a megabyte of it.
        length = len(data.strip() if self.trim_whitespace else data)
        if self.max_length is not None and length > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class StrictEmailField(StrictCharField, serializers.EmailField):
    pass


# The model's validators, less its length check: StrictCharField checks the length itself.
USERNAME_VALIDATORS = [
    v for v in User._meta.get_field("username").validators
    if not isinstance(v, MaxLengthValidator)
]


class UserOutputSerializer(serializers.Serializer):
    """The four public fields of a user (documentation of ``user_representation``)."""

    userId = serializers.UUIDField()
    username = serializers.CharField()
    email = serializers.EmailField()
    registrationTimestamp = serializers.DateTimeField(help_text="UTC, ISO 8601, ending in Z")

    class Meta:
        ref_name = "User"


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
            validators=USERNAME_VALIDATORS,
        )
        email = StrictEmailField(max_length=User._meta.get_field("email").max_length)
        password = StrictCharField(
            max_length=PASSWORD_MAX_LENGTH, trim_whitespace=False, style={"input_type": "password"}
        )

        class Meta:
            ref_name = "Register"

        def validate(self, attrs):
            candidate = User(username=attrs["username"], email=attrs["email"])
            try:
                password_validation.validate_password(attrs["password"], user=candidate)
            except DjangoValidationError as exc:
                raise serializers.ValidationError({"password": list(exc.messages)})
            return attrs

    @extend_schema(
        operation_id="auth_register", tags=["auth"],
        request=InputSerializer, examples=[REGISTER_EXAMPLE],
        responses={
            201: OpenApiResponse(UserOutputSerializer, description="Registered."),
            400: error_response(
                "Bad input, under the field it is about; a username or email already taken "
                "(compared case-insensitively) included. A body that is not a JSON object: "
                "under detail.",
                error_serializer("RegisterError", "username", "email", "password"),
            ),
            413: TOO_LARGE,
            415: UNSUPPORTED,
            429: THROTTLED,
        },
        parameters=[RETRY_AFTER],
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            user = user_register(**serializer.validated_data)
        except RegistrationConflict as exc:
            raise serializers.ValidationError({exc.field: [exc.message]})
        return Response(user_representation(user), status=status.HTTP_201_CREATED)


class TokenObtainApi(APIView):
    """POST /api/auth/token — exchange username and password for an API token.

    The username matches as at registration: NFKC-normalised, case-insensitive ("SAM" logs in
    the user registered as "sam").
    """

    authentication_classes = []
    permission_classes = [AllowAny]
    # Per client address, and per username from all addresses together (a distributed guess).
    throttle_classes = [ScopedRateThrottle, UsernameRateThrottle]
    throttle_scope = "token"

    class InputSerializer(serializers.Serializer):
        username = StrictCharField(max_length=User._meta.get_field("username").max_length)
        password = StrictCharField(
            max_length=PASSWORD_MAX_LENGTH, trim_whitespace=False, style={"input_type": "password"}
        )

        class Meta:
            ref_name = "TokenObtain"

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField(help_text="Send as `Authorization: Token <token>`.")
        expiresAt = serializers.DateTimeField(
            allow_null=True,
            help_text="When the token stops working (UTC, ISO 8601, ending in Z): "
            "AUTH_TOKEN_TTL after it was issued; null where tokens never expire. Log in again "
            "then: a new token replaces it.",
        )

        class Meta:
            ref_name = "Token"

    @extend_schema(
        operation_id="auth_token", tags=["auth"],
        request=InputSerializer, examples=[TOKEN_EXAMPLE],
        responses={
            200: OpenApiResponse(OutputSerializer, description="The user's API token."),
            400: error_response(
                "A missing or malformed field, under its name; wrong credentials under detail.",
                error_serializer("TokenError", "username", "password"),
            ),
            413: TOO_LARGE,
            415: UNSUPPORTED,
            429: error_response(
                "Too many attempts from this address, or at this username from any address "
                "(TOKEN_THROTTLE_RATE, TOKEN_USERNAME_THROTTLE_RATE); see Retry-After."
            ),
        },
        parameters=[RETRY_AFTER],
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = user_authenticate(**serializer.validated_data, request=request)
        if user is None:
            # Not about one field: which of the two was wrong is not for the client to learn.
            raise serializers.ValidationError("Unable to log in with provided credentials.")
        token = user_token_get_or_create(user=user)
        return Response(self.OutputSerializer(
            {"token": token.key, "expiresAt": token_expires_at(token)}
        ).data)


class LogoutApi(APIView):
    """POST /api/auth/logout — revoke the token the request carries.

    Every later request with it gets a 401; the next login issues a new one. Token
    authentication only: it is the token that is revoked (one per user, so every client of
    the user is logged out).
    """

    authentication_classes = [ExpiringTokenAuthentication]

    @extend_schema(
        operation_id="auth_logout", tags=["auth"], request=None,
        responses={
            204: OpenApiResponse(description="Revoked: the token no longer works."),
            401: UNAUTHENTICATED,
        },
    )
    def post(self, request):
        user_token_revoke(token=request.auth)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeApi(APIView):
    """/api/auth/me — the token's user (``Authorization: Token <key>``): read it, rename it,
    erase it."""

    class RenameInputSerializer(serializers.Serializer):
        username = StrictCharField(
            max_length=User._meta.get_field("username").max_length,
            validators=USERNAME_VALIDATORS,
        )

        class Meta:
            ref_name = "Rename"

    class EraseInputSerializer(serializers.Serializer):
        password = StrictCharField(
            max_length=PASSWORD_MAX_LENGTH, trim_whitespace=False,
            style={"input_type": "password"}, help_text="The user's current password.",
        )

        class Meta:
            ref_name = "Erase"

    def get_throttles(self):
        if self.request.method == "DELETE":
            # It checks a password: the login's limits, per address and per account.
            self.throttle_scope = "token"
            return [ScopedRateThrottle(), UsernameRateThrottle()]
        return super().get_throttles()

    @extend_schema(
        operation_id="auth_me", tags=["auth"],
        responses={200: UserOutputSerializer, 401: UNAUTHENTICATED},
    )
    def get(self, request):
        return Response(user_representation(request.user))

    @extend_schema(
        operation_id="auth_me_rename", tags=["auth"], request=RenameInputSerializer,
        examples=[OpenApiExample("rename", request_only=True, value={"username": "sammy"})],
        responses={
            200: OpenApiResponse(UserOutputSerializer, description="Renamed; every service "
                                 "keeping a copy of the name hears of it (user.renamed)."),
            400: error_response(
                "A missing or malformed username, or one another user has (compared "
                "case-insensitively), under username.",
                error_serializer("RenameError", "username"),
            ),
            401: UNAUTHENTICATED, 413: TOO_LARGE, 415: UNSUPPORTED,
        },
    )
    def patch(self, request):
        serializer = self.RenameInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            user = user_rename(user=request.user, **serializer.validated_data)
        except RegistrationConflict as exc:
            raise serializers.ValidationError({exc.field: [exc.message]})
        return Response(user_representation(user))

    @extend_schema(
        operation_id="auth_me_erase", tags=["auth"], request=EraseInputSerializer,
        examples=[OpenApiExample("erase", request_only=True,
                                 value={"password": EXAMPLE_PASSWORD})],
        responses={
            204: OpenApiResponse(description="Erased: the account and its tokens are gone at "
                                 "once, and every service erases the user's data on its own "
                                 "(user.deleted)."),
            400: error_response("A missing or wrong password, under password.",
                                error_serializer("EraseError", "password")),
            401: UNAUTHENTICATED, 413: TOO_LARGE, 415: UNSUPPORTED,
            429: error_response("Too many password checks from this address, or for this "
                                "account (the login's limits); see Retry-After."),
        },
        parameters=[RETRY_AFTER],
    )
    def delete(self, request):
        serializer = self.EraseInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if not request.user.check_password(serializer.validated_data["password"]):
            raise serializers.ValidationError({"password": ["Wrong password."]})
        user_delete(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class UserApi(APIView):
    """/api/users/{userId} — a user by id, for staff: erase it."""

    @extend_schema(
        operation_id="users_erase", tags=["auth"], request=None,
        responses={
            204: OpenApiResponse(description="Erased, as DELETE /api/auth/me erases."),
            401: UNAUTHENTICATED,
            403: error_response("Not staff."),
            404: error_response("No user with this id."),
        },
    )
    def delete(self, request, userId):  # the path parameter's name, as documented
        if not request.user.is_staff:
            raise PermissionDenied("Only staff may erase a user.")
        user = User.objects.filter(pk=userId).first()
        if user is None:
            raise NotFound("No user with this id.")
        user_delete(user=user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class OnboardingOutputSerializer(serializers.Serializer):
    """Per service, whether the user's defaults are all there; ``complete`` once every one is."""

    class ServiceSerializer(serializers.Serializer):
        ready = serializers.BooleanField(help_text="All of this service's defaults exist.")

        class Meta:
            ref_name = "OnboardingService"

    userId = serializers.UUIDField(source="user_id")
    complete = serializers.BooleanField(help_text="Every service is ready.")
    services = serializers.DictField(
        child=ServiceSerializer(), help_text="Keyed by service name (players, buildings, ...)."
    )

    class Meta:
        ref_name = "Onboarding"

    def to_representation(self, instance: UserOnboarding):
        return {
            "userId": str(instance.user_id),
            "complete": instance.complete,
            "services": {name: {"ready": ready} for name, ready in instance.services.items()},
        }


class MeOnboardingApi(APIView):
    """GET /api/auth/me/onboarding — has every service set the token's user up yet?

    The game client polls it after registering: the services create their defaults on their
    own, a moment after the 201.
    """

    @extend_schema(
        operation_id="auth_me_onboarding", tags=["onboarding"],
        responses={200: OnboardingOutputSerializer, 401: UNAUTHENTICATED},
    )
    def get(self, request):
        onboarding = user_onboarding_get(user_id=request.user.id)
        return Response(OnboardingOutputSerializer(onboarding).data)


class UserOnboardingApi(APIView):
    """GET /api/users/{userId}/onboarding — any user's onboarding, for staff (or the user)."""

    @extend_schema(
        operation_id="users_onboarding", tags=["onboarding"],
        responses={
            200: OnboardingOutputSerializer,
            401: UNAUTHENTICATED,
            403: error_response("Not staff, and not the user's own id."),
            404: error_response("No user with this id."),
        },
    )
    def get(self, request, userId):  # the path parameter's name, as documented
        # Before the lookup: whether an id exists is not for other users to learn.
        if not (request.user.is_staff or request.user.id == userId):
            raise PermissionDenied("Only staff may read another user's onboarding.")
        onboarding = user_onboarding_get(user_id=userId)
        if onboarding is None:
            raise NotFound("No user with this id.")
        return Response(OnboardingOutputSerializer(onboarding).data)
