"""Messages a consumer set aside (``store``), sent back to that consumer alone (``replay``), and
the repairs ``reconcile`` sends the same way (``redelivery``)."""
