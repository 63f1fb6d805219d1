from django.db import models
from django.db.models import Q
from django.utils import timezone

# Where the event bus's rows live. The outbox lives with the producer's data (accounts), in the
# default database, so that a row commits with the change it announces. The dead letters of
# every consumer sit together beside it, so the admin and `manage.py deadletters` show them in
# one list. Each context's inbox (ProcessedEvent) lives in that context's own database.
OUTBOX_DATABASE = "default"
DEAD_LETTER_DATABASE = "default"


class OutboxEvent(models.Model):
    """An event written in the producer's own transaction, waiting to reach JetStream.

    The row commits with the business change or not at all, so an event can be neither lost
    (the relay publishes every row still unpublished) nor invented by a rolled-back request.
    ``event_id`` travels as ``Nats-Msg-Id``: republishing a row is deduplicated by JetStream.
    """

    event_id = models.UUIDField(unique=True, editable=False)
    subject = models.CharField(max_length=255)
    payload = models.TextField(help_text="The exact JSON published.")
    headers = models.JSONField(default=dict)
    # What the event is about (the contract's ``key``: the user). An erasure of the key deletes
    # the stream's copies of its earlier events and these rows (erasure.py). Not indexed: only
    # an erasure looks rows up by key, in the relay, on a table pruning keeps to
    # NATS_DUPLICATE_WINDOW; an index would cost every registration a random-key insert.
    key = models.CharField(max_length=64, blank=True, default="")
    # Where JetStream stored it (its PubAck), so that an erasure can delete it by sequence.
    stream_seq = models.BigIntegerField(
        null=True, blank=True, help_text="The message's sequence in the stream, once published."
    )
    # Not indexed: every registration and every marking (an UPDATE that PostgreSQL cannot keep
    # HOT) paid for an index that only the admin's date filters read, on a table that pruning
    # keeps to NATS_DUPLICATE_WINDOW (docs/benchmarks.md, "Register").
    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="Relay publish attempts.")
    last_error = models.TextField(blank=True)
    # A row that failed every attempt (a subject outside the stream, a payload over the server's
    # limit) is set aside so that it cannot block the rows behind it; an operator requeues it.
    set_aside_at = models.DateTimeField(
        null=True, blank=True, help_text="When the relay stopped trying to publish it."
    )

    class Meta:
        ordering = ["id"]
        indexes = [
            # The relay scans unpublished rows in id order; keep that index small.
            models.Index(
                fields=["id"], condition=Q(published_at__isnull=True), name="outbox_unpublished"
            ),
            # Pruning deletes published rows older than the duplicate window.
            models.Index(
                fields=["published_at"],
                condition=Q(published_at__isnull=False),
                name="outbox_published",
            ),
        ]

    def __str__(self):
        return f"{self.subject} {self.event_id}"


class PublishedMessage(models.Model):
    """A message about a key that the stream may still hold, and where: kept while the stream
    keeps messages (``NATS_STREAM_MAX_AGE``), so that erasing the key can delete it by sequence.

    Pruning moves a keyed outbox row here when it deletes the row (after
    ``NATS_DUPLICATE_WINDOW``); copies published outside the outbox (a dead letter's replay, a
    reconcile repair) are recorded here at once. Holds no payload: nothing personal.
    """

    key = models.CharField(max_length=64, db_index=True)
    stream = models.CharField(max_length=255)
    stream_seq = models.BigIntegerField()
    subject = models.CharField(max_length=255)
    event_id = models.CharField(max_length=128, blank=True)
    published_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["stream", "stream_seq"], name="published_once_per_seq")
        ]

    def __str__(self):
        return f"{self.subject} seq={self.stream_seq}"


class Erasure(models.Model):
    """A key to erase from the event bus: written in the transaction that erases its owner,
    beside the event that announces it (``outbox_publish_on_commit(erase=True)``).

    Once that event is published, the relay deletes the stream's copies of the key's earlier
    events (by sequence: the outbox rows' and :class:`PublishedMessage`'s) and those outbox
    rows, and notes when (``stream_erased_at``). The erasing event itself stays: it carries no
    personal data, and the services that have not handled it yet still need it.
    """

    key = models.CharField(max_length=64, unique=True)
    event_id = models.UUIDField(help_text="The event that announces the erasure.")
    requested_at = models.DateTimeField(default=timezone.now)
    stream_erased_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When the stream's copies of the key's earlier events were deleted.",
    )
    messages_deleted = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-requested_at"]
        indexes = [
            models.Index(fields=["id"], condition=Q(stream_erased_at__isnull=True),
                         name="erasure_pending"),
        ]

    def __str__(self):
        return f"erasure of {self.key}"


class Tombstone(models.Model):
    """A user a context erased: in that context's own database, beside its inbox.

    Written with the deletion of the user's rows (``user.deleted``); the services' INSERTs skip
    tombstoned users (``insert_ignoring_conflicts(unless_erased=...)``), so an older event for
    the user that arrives later — a replayed dead letter, a repair sent before, a consumer that
    was down — creates nothing. Kept for good: it holds only the id, and it is what keeps an
    erased user erased.
    """

    context = models.CharField(max_length=64)
    user_id = models.UUIDField()
    erased_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user_id", "context"], name="tombstone_once")
        ]

    def __str__(self):
        return f"{self.context} erased {self.user_id}"


class Announcement(models.Model):
    """What a context announces of the work it did for users (``user.onboarded.<context>``,
    ``user.erased.<context>``, one row for the users of a transaction): an outbox in the
    context's own database, beside its inbox.

    Written in the transaction that applied the handler, so the announcement commits with the
    rows it speaks of, or not at all. The context's ``consume`` process publishes it: at once
    after the commit, and a scan for what that missed (a crash, NATS down). ``event_id``
    travels as ``Nats-Msg-Id``: publishing a row twice is deduplicated by JetStream. Its headers
    follow from the subject and the event id (``contracts.event_headers``), so none are kept.
    """

    # Not indexed: rows are found by id (the scan, the marks). Every handled batch writes one,
    # so an index would cost every batch a write in every context.
    event_id = models.UUIDField(editable=False)
    context = models.CharField(max_length=64)
    subject = models.CharField(max_length=255)
    payload = models.TextField(help_text="The exact JSON published.")
    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            # The scan reads one context's unpublished rows in id order.
            models.Index(fields=["context", "id"], condition=Q(published_at__isnull=True),
                         name="announcement_unpublished"),
            # Pruning deletes published rows older than the duplicate window.
            models.Index(fields=["published_at"], condition=Q(published_at__isnull=False),
                         name="announcement_published"),
        ]

    def __str__(self):
        return f"{self.subject} {self.event_id}"


class ProcessedEvent(models.Model):
    """The inbox: one row per (consumer, event) handled, in the consumer's own database.

    Written in the same transaction as the consumer's business rows, so a redelivered event is
    recognised and skipped; the unique constraint makes two racing deliveries serialise.
    """

    consumer = models.CharField(max_length=64)
    event_id = models.CharField(max_length=128)
    subject = models.CharField(max_length=255)
    stream_seq = models.BigIntegerField()
    processed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["consumer", "event_id"], name="inbox_once_per_consumer")
        ]
        indexes = [
            # Pruning deletes rows older than the stream's max age.
            models.Index(fields=["processed_at"], name="inbox_processed_at"),
        ]

    def __str__(self):
        return f"{self.consumer} {self.event_id}"


class DeadLetter(models.Model):
    """A message a consumer set aside: it broke the contract or failed every delivery.

    Kept whole (raw payload, headers, where it sat in the stream) so it can be inspected and
    redelivered to that one consumer once the cause is fixed. Stored before the original is
    terminated, so nothing is lost between the two.
    """

    consumer = models.CharField(max_length=64)
    stream = models.CharField(max_length=255)
    stream_seq = models.BigIntegerField()
    subject = models.CharField(max_length=255)
    event_id = models.CharField(max_length=128, blank=True)
    user_id = models.CharField(
        max_length=64, blank=True, db_index=True, help_text="From the payload, when readable."
    )
    payload = models.BinaryField()
    headers = models.JSONField(default=dict)
    deliveries = models.PositiveIntegerField()
    error_type = models.CharField(max_length=255)
    error_message = models.TextField()
    first_failed_at = models.DateTimeField(default=timezone.now)
    last_failed_at = models.DateTimeField(default=timezone.now)
    replays = models.PositiveIntegerField(default=0, help_text="Times sent back to the consumer.")
    replayed_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When a replay was processed."
    )
    # A dead letter that no replay can fix (a payload that will never meet the contract, a user
    # deleted since) is discarded rather than deleted: the record of what was lost stays, but it
    # no longer makes the flow unhealthy nor shows in the default lists.
    discarded_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When an operator gave up on it."
    )
    discarded_by = models.CharField(max_length=150, blank=True)
    discard_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-last_failed_at"]
        constraints = [
            # The event id is part of the key: a stream that is deleted and created again
            # restarts its sequence numbers, and a new failure must not overwrite an old one.
            models.UniqueConstraint(
                fields=["consumer", "stream", "stream_seq", "event_id"],
                name="deadletter_once_per_message",
            )
        ]

    def __str__(self):
        return f"{self.consumer} seq={self.stream_seq} {self.error_type}"

    @property
    def payload_text(self) -> str:
        return bytes(self.payload).decode("utf-8", errors="replace")
