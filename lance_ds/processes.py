"""Processes and their surroundings: children that must not outlive their parent (loader workers, converter
workers), ranks that must outlive their console, ranks that say where they are stuck; no torch import."""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import sys
import tempfile
import threading
import time


def die_with_parent(parent: int | None = None, interval_s: float = 0.5) -> None:
    """Call in a child: it exits within `interval_s` of its parent (pid `parent`, given by the parent when it may
    itself be pid 1, in a container; default: the current parent). A parent killed with -9 gives its children no
    chance to notice: a loader worker blocked writing into a pipe lived on, orphaned, with its memory (seen: 430 MB
    each, 18 minutes after the kill); converter workers went on writing into the output a re-run was using.

    A thread that watches the parent, not prctl(PR_SET_PDEATHSIG): that signal comes when the parent *thread* that
    forked the child ends, so a loader iterated from a thread that finished lost its workers at any point, even
    holding a lock the loader's shutdown then waited on forever."""
    if parent is None:
        parent = os.getppid()
        if parent == 1:  # the parent died before this child started watching
            os._exit(1)
    elif os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


class LosableConsole:
    """sys.stdout / sys.stderr of a rank, which go on when the console goes away.

    Multi-node ranks write into ssh pipes that end with the launcher (a stop kills pdsh, and its ssh sessions with
    it); a console can hang up too. The next progress bar update then raised BrokenPipeError and the rank died
    unsaved, a step before the stop signal it was about to save for. Here, on the first write that finds no reader,
    the stream's file descriptor is pointed at /dev/null (for every writer of it: logging handlers, C code) and the
    run goes on: TensorBoard and the checkpoints are its record."""

    LOST = (errno.EPIPE, errno.EIO, errno.ECONNRESET)

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._lose(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._lose(e)

    def _lose(self, error: OSError) -> None:
        if error.errno not in self.LOST:
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        try:
            self._stream.flush()  # what the lost reader did not take goes to /dev/null now
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_lost_console() -> None:
    """Make this process's stdout and stderr LosableConsoles (call before any progress bar takes sys.stderr)."""
    if not isinstance(sys.stdout, LosableConsole):
        sys.stdout = LosableConsole(sys.stdout)
    if not isinstance(sys.stderr, LosableConsole):
        sys.stderr = LosableConsole(sys.stderr)


@contextlib.contextmanager
def said_if_slow(what: str, after_s: float, why: str):
    """Within the block, once it has run `after_s` seconds, say so on stderr with where every thread of this process
    is: the rank that holds the others up in a collective says what holds it (a file system read that does not
    return, a loader worker that sends nothing, a GPU call). From a thread, so it speaks while the main thread is
    stuck in C code."""
    timer = threading.Timer(after_s, _say_where, args=(what, after_s, why))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _say_where(what: str, after_s: float, why: str) -> None:
    with tempfile.TemporaryFile("w+") as dump:
        faulthandler.dump_traceback(file=dump, all_threads=True)
        dump.seek(0)
        stacks = dump.read()
    said = (f"lance_ds: rank {os.environ.get('RANK', '0')}: {what} has run {after_s:g} s ({why}); where this rank's "
            f"threads are:\n{stacks}")
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), said.encode())  # one write: ranks that say where they are at once do not interleave
