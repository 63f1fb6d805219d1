"""Error reports (the DEBUG page, error e-mails) that do not show NATS credentials.

Django hides settings whose names contain KEY, PASS, TOKEN, SECRET...; ``NATS_URL`` may carry a
password or a token too (``nats://relay:<password>@host``), and ``NATS_CREDS`` names a secret.
"""

import re

from django.views.debug import SafeExceptionReporterFilter


class ReporterFilter(SafeExceptionReporterFilter):
    hidden_settings = re.compile(
        SafeExceptionReporterFilter.hidden_settings.pattern + "|NATS_URL|NATS_CREDS", flags=re.I
    )
