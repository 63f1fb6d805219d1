"""The broker client: everything that knows how to talk to NATS, and nothing of the flow.

Connecting with a process's own settings (``options``, ``connection``), telling a refusal from
an outage (``refusals``), fetching from a pull consumer (``pull``), publishing many messages at
once (``publish``), provisioning the stream and the durables (``provisioning``), and every read
of nats-py's private internals (``compat``). Imports only the event bus's kernel.
"""
