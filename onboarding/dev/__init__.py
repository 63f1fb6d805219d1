"""Development tools, kept out of what production imports: the embedded ``nats-server``
(:mod:`onboarding.dev.natsserver`, for ``make run``, the tests, the benchmarks and the
rehearsal), the commands ``make run`` uses (``manage.py dev_nats``, ``manage.py procfile``) and
what it runs honcho under, so that Ctrl-C ends it with status 0 (:mod:`onboarding.dev.foreground`).

It is an installed app only so that Django finds those commands; no module of the event bus,
of a context or of the project's settings imports from here (``tests/test_layout.py``).
"""
