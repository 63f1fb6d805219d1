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
