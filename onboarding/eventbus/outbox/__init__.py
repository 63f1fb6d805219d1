"""The sending side: an event written in the producer's transaction reaches JetStream.

``write`` records the event with the change it announces (``outbox_publish_on_commit``); the
commit wakes the relay (``hints``: ``notify`` on PostgreSQL, ``wake`` on SQLite) or a publisher
thread (``publisher``); the relay (``relay``, its fast path ``listening``, its lock
``leadership``) publishes whatever is left, and sets aside what JetStream refuses for good
(``refusals``). ``store`` is the outbox table's queries. Never imports the consumer side.
"""
