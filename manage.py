#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys

# What a process killed by SIGPIPE reports (128 + 13), as `yes | head` reports for `yes`.
EXIT_READER_LEFT = 141


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        # Load the settings first: a configuration error (a variable missing or malformed) is
        # the user's to fix, and says so in one line, not in a traceback that starts with
        # Django failing to find the command.
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as exc:
        sys.exit(f"manage.py: {exc}")
    from django.core.management import execute_from_command_line

    from onboarding.databases import name_connections

    # pg_stat_activity tells whose each session is; the commands that are a role of their own
    # (consume, outbox_relay) and the web app (wsgi.py) rename theirs.
    name_connections(" ".join(["manage.py", *sys.argv[1:2]]))
    sys.stdout = Stdout(sys.stdout)
    try:
        try:
            execute_from_command_line(sys.argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a failure must reach the except below
    except ReaderLeft:
        # What the command left half done is released as this block ends, after Django closed
        # its database connections: dumpdata's cursor iterator then fails to close its cursor
        # ("Exception ignored ... Cannot operate on a closed database"). Noise of the cut, not
        # an error of its own: muted until it is collected.
        unraisablehook, sys.unraisablehook = sys.unraisablehook, ignore
    else:
        return
    import gc

    gc.collect()
    sys.unraisablehook = unraisablehook
    # `manage.py ... | head`: the reader took what it wanted and closed the pipe. End quietly,
    # as the Python docs' recipe for SIGPIPE does: stdout to devnull, so that the flush at exit
    # does not fail again. Not 0: the command stopped before it finished (writing, and whatever
    # it was doing); not 1, which a command uses for its own verdict (onboarding_status:
    # unhealthy); 141 is what a shell reports for any tool cut short so, which scripts with
    # `set -o pipefail` already expect.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_READER_LEFT)


def ignore(unraisable):
    pass


class ReaderLeft(BaseException):
    """stdout's reader closed the pipe. A ``BaseException``, as ``SystemExit`` is, so that a
    command's ``except Exception`` cannot turn it into an error message (``dumpdata`` wraps
    every error in a ``CommandError``: "Unable to serialize database: [Errno 32] Broken pipe").
    """


class Stdout:
    """``sys.stdout``, whose broken pipe is :class:`ReaderLeft`. Only stdout's: a
    ``BrokenPipeError`` from anything else (a socket) stays an error, with its traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise ReaderLeft from None

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise ReaderLeft from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":
    main()
