"""What every long-running process of the event bus runs on: stopping and backing off
(``lifecycle``), metrics (``metrics``), the heartbeat file (``liveness``), pruning the bus's
tables in the background (``pruning``), and warming up before the first event (``warmup``)."""
