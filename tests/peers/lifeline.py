"""Run a test peer and stop it when the test process that started it goes away.

The harness starts every peer in its own process group and kills that group when the peer's guard
is dropped. A test process that dies without unwinding (Ctrl-C, SIGKILL, an abort) drops nothing,
so the harness also holds this script's stdin open: end of file on stdin means the test process is
gone, and the peer is stopped instead of being left running on its port.

Usage: lifeline.py PROGRAM [ARGS...]      exits with the peer's exit status
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_SECONDS = 3


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: lifeline.py PROGRAM [ARGS...]", file=sys.stderr)
        return 64
    peer = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)

    def stop(*_args) -> None:
        if peer.poll() is None:
            peer.terminate()
            try:
                peer.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                peer.kill()

    def watch_stdin() -> None:
        # read() returns only at end of file, i.e. when every holder of the pipe's write end is gone.
        sys.stdin.buffer.read()
        stop()

    threading.Thread(target=watch_stdin, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: (stop(), os._exit(128 + signum)))
    return peer.wait()


if __name__ == "__main__":
    sys.exit(main())
