"""A minimal process supervisor: keeps one server process alive, restarting it when it dies.

    python -m loadtest.servers.supervisor --events events.log -- python -m uvicorn ...

It stands in for Ray Serve's controller when the chaos drill tests itself on real processes:
the drill kills the child (SIGKILL), the supervisor notices and starts a new one after
--restart-delay seconds, and logs `<unix time> started <pid>` / `<unix time> died <pid>`
lines (and `ready <pid>` once it accepts connections on --ready-port) that give the replica
count over time. SIGTERM stops it and its child.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--restart-delay", type=float, default=0.2)
    parser.add_argument("--ready-port", type=int, default=None, help="log `ready` once this port accepts")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with args.events.open("a", buffering=1) as events:
        while not stopping:
            child = subprocess.Popen(command)
            events.write(f"{time.time():.3f} started {child.pid}\n")
            ready = args.ready_port is None
            while child.poll() is None and not stopping:
                if not ready:
                    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", args.ready_port), 0.2):
                        ready = True
                        events.write(f"{time.time():.3f} ready {child.pid}\n")
                time.sleep(0.02)
            if stopping:
                child.terminate()
                child.wait(10)
                break
            events.write(f"{time.time():.3f} died {child.pid}\n")
            time.sleep(args.restart_delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
