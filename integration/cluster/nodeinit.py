"""PID 1 of a cluster node's PID namespace: reap every orphan, exit on SIGTERM/SIGINT.

Started by the harness as ``unshare -p -f --mount-proc ... python3 nodeinit.py``.  Orphans of
the node (pacemaker's subdaemons, agents' children) are re-parented to this process, which
reaps them at once instead of leaving zombies.  When it exits, the kernel kills whatever is
left in the namespace, so a node's teardown never depends on finding its processes by name.

A PID 1 only receives the signals it has a handler for, so SIGTERM/SIGINT/SIGCHLD get (no-op)
handlers and are then blocked and taken with sigtimedwait: no race between the last waitpid
and the wait for the next signal.
"""

import os
import signal
import sys

WANTED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def main() -> int:
    for s in WANTED:
        signal.signal(s, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, WANTED)
    print("ready", flush=True)
    while True:
        while True:  # reap everything that has exited
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        info = signal.sigtimedwait(WANTED, 5.0)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            return 0


if __name__ == "__main__":
    sys.exit(main())
