"""Child processes that must not outlive their parent (loader workers, converter workers); no torch import."""

from __future__ import annotations

import os
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
