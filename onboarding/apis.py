"""The project's own endpoints: the index at ``/`` and the health probes.

The probes are for load balancers and orchestrators: plain JSON, no authentication (nothing
to look up, so ``/healthz`` touches no database), no throttle (a probe refused for being
frequent would read as an outage), and nothing about any user.
"""

from django.urls import reverse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from onboarding.health import readiness_problems
from onboarding.openapi import error_response, error_serializer

# Never cached by a proxy: each probe must see the state of now.
NO_STORE = {"Cache-Control": "no-store"}


class PublicJsonApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []
    renderer_classes = [JSONRenderer]


class IndexApi(PublicJsonApi):
    """GET / — where things are: the API docs, the schema, the admin, the probes."""

    class OutputSerializer(serializers.Serializer):
        docs = serializers.CharField(help_text="Swagger UI")
        schema = serializers.CharField(help_text="OpenAPI 3 schema")
        admin = serializers.CharField()
        healthz = serializers.CharField()
        readyz = serializers.CharField()

        class Meta:
            ref_name = "Index"

    @extend_schema(operation_id="index", tags=["index"], responses={200: OutputSerializer})
    def get(self, request):
        return Response({
            "docs": reverse("api-docs"),
            "schema": reverse("api-schema"),
            "admin": reverse("admin:index"),
            "healthz": reverse("healthz"),
            "readyz": reverse("readyz"),
        })


class HealthzApi(PublicJsonApi):
    """GET /healthz — the process is alive and serving requests. Checks nothing else."""

    class OutputSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=["ok"])

        class Meta:
            ref_name = "Healthz"

    @extend_schema(
        operation_id="healthz", tags=["health"],
        responses={200: OpenApiResponse(OutputSerializer, description="The process is alive.")},
    )
    def get(self, request):
        return Response({"status": "ok"}, headers=NO_STORE)


class ReadyzApi(PublicJsonApi):
    """GET /readyz — the process can serve registrations: its default database answers and,
    where the web process publishes events itself (SQLite), NATS accepts it. 503 names what
    is not ready."""

    class OutputSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=["ready"])
        checks = serializers.DictField(
            child=serializers.ChoiceField(choices=["ok"]),
            help_text='What was checked: "database", and "nats" where this process publishes.',
        )

        class Meta:
            ref_name = "Readyz"

    @extend_schema(
        operation_id="readyz", tags=["health"],
        responses={
            200: OpenApiResponse(OutputSerializer, description="Ready: every check passed."),
            503: error_response(
                "Not ready: each component that failed, with its problem.",
                error_serializer(
                    "NotReady", "database", "nats", detail=False,
                    description='The components that are not ready: {"<component>": '
                    '["<problem>"]}, in the API\'s one error shape.',
                ),
            ),
        },
    )
    def get(self, request):
        checked, problems = readiness_problems()
        if problems:
            body = {name: [problem] for name, problem in problems.items()}
            return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers=NO_STORE)
        return Response(
            {"status": "ready", "checks": dict.fromkeys(checked, "ok")}, headers=NO_STORE
        )
