"""A database thread that cannot hold a stopping process open."""

from __future__ import annotations

import concurrent.futures
import queue
import threading


class DaemonThread(concurrent.futures.Executor):
    """One daemon thread that runs what is submitted to it, in order (an executor for
    ``loop.run_in_executor``).

    Not a ``ThreadPoolExecutor``: the interpreter joins those threads at exit, so a call blocked
    in the database (an abandoned transaction waiting on a row lock, a query on a connection that
    died silently) would keep a SIGTERMed process alive until the database or TCP gave up,
    minutes later. A daemon thread ends with the process; its transaction, never committed, ends
    with its connection on the server's side.
    """

    def __init__(self, name: str, initializer=None) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(initializer,), name=name,
                                        daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError(f"{self._thread.name}: cannot submit after shutdown")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; what was submitted still runs, unless ``cancel_futures``."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)  # the thread's end, after what is queued before it
        if wait:
            self._thread.join()

    def _run(self, initializer) -> None:
        if initializer is not None:
            initializer()
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)
            else:
                future.set_result(result)
