"""The launcher's reaper: when `serving.launch` exits, whatever killed it, nothing it started outlives it.

    python -m serving.reaper <launcher pid>      (started by serving.launch itself)

Ray starts its node processes, workers and Serve's HAProxy under the launcher, but a SIGKILL of the
launcher (or an OOM kill, or a crash in Ray's shutdown) leaves them running: HAProxy kept the serving
port for tens of seconds answering 500, and the next `make serve` failed with "cannot bind socket".
The reaper runs in a session of its own (a terminal's Ctrl-C and a kill of the launcher's process
group do not reach it), remembers the launcher's process tree every `interval_s`, and once the
launcher is gone SIGKILLs every process of that tree still alive. A process is known by its pid and
its start time, so a pid the kernel has reused for someone else's process is never signalled.
Linux only (/proc and pidfd).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

Process = tuple[int, int]  # (pid, start time in clock ticks since boot): a process, not just a pid


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process, read from /proc (raw reads: this runs twice a second)."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 4096)
            finally:
                os.close(fd)
            fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def tree(roots: set[int], table: dict[int, tuple[int, int]]) -> set[Process]:
    """The processes below `roots` (not the roots themselves), as (pid, start time)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[Process] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, table[child][1]))
            stack.append(child)
    return found


def named(processes: set[Process], executable: str) -> list[int]:
    """The pids among `processes` whose program is `executable` (its file name, as in argv[0])."""
    found = []
    for pid, _ in processes:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv0 = cmdline.read().split(b"\0", 1)[0]
            if os.path.basename(argv0.decode(errors="replace")) == executable:
                found.append(pid)
    return sorted(found)


def kill_tree(known: set[Process], exclude: int) -> list[int]:
    """SIGKILL every known process still alive (same pid and start time) and everything now below those.

    Returns the pids signalled. Orphans of the dead launcher were re-parented to init, so the processes
    below it are found from what was remembered, then from the survivors' own children."""
    table = process_table()
    alive = {(pid, start) for pid, start in known if table.get(pid, (0, -1))[1] == start}
    alive |= tree({pid for pid, _ in alive}, table)
    killed = []
    for pid, _ in sorted(alive):
        if pid == exclude:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def program(pid: int) -> str:
    """The kernel's name of a process (for messages; "?" once it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def watch(launcher: int, interval_s: float = 0.5) -> list[str]:
    """Remember the launcher's process tree until the launcher exits, then kill what is left of it: returns
    "pid program" of each process killed."""
    me = os.getpid()
    known: set[Process] = set()
    try:
        handle = os.pidfd_open(launcher)
    except ProcessLookupError:
        return []
    try:
        while True:
            table = process_table()
            known |= {p for p in tree({launcher}, table) if p[0] != me}
            ready, _, _ = select.select([handle], [], [], interval_s)
            if ready:  # the launcher has exited (a pidfd becomes readable then)
                names = {pid: program(pid) for pid, _ in known}
                return [f"{pid} {names.get(pid) or program(pid)}" for pid in kill_tree(known, exclude=me)]
    finally:
        os.close(handle)


def start(launcher: int | None = None) -> subprocess.Popen:
    """Start the reaper of `launcher` (default: this process) in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "serving.reaper", str(launcher or os.getpid())],
                            start_new_session=True, stdin=subprocess.DEVNULL, close_fds=True)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: `python -m serving.reaper <pid>`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        raise SystemExit("usage: python -m serving.reaper <launcher pid>")
    for sig in (signal.SIGINT, signal.SIGHUP):  # a closing terminal must not stop the clean-up
        signal.signal(sig, signal.SIG_IGN)
    killed = watch(int(args[0]))
    if killed:
        print(f"serving.reaper: launcher {args[0]} is gone; killed {len(killed)} of its processes still running: "
              + ", ".join(killed[:12]) + (" ..." if len(killed) > 12 else ""), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
