"""The one place that talks to NATS JetStream.

Outbox and relay (publishing), stream and consumer provisioning, the generic consumer runner
with its inbox and dead letters, and the management commands that run them. Bounded contexts
only declare, in their ``consumers.py``, which events they handle and with which service.
"""
