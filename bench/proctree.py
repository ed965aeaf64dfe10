"""bench/proctree.py: CPU time and memory of a server's process tree around one command.

  proctree.py OUT.json ROOT_PID -- COMMAND [ARGS...]

Reads /proc/<pid>/stat utime+stime (plus cutime+cstime: children already reaped) of ROOT_PID
and every descendant before and after COMMAND, samples the tree's summed VmRSS every 0.2 s
while COMMAND runs, and reads the tree's summed VmHWM (each process's own peak resident set;
the sum is an upper bound of the tree's peak) at the end. Writes
{"cpu_s", "rss_peak_kb", "hwm_kb", "processes"} to OUT.json and exits with COMMAND's status.
Python standard library only (runs under the system python3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

TICK = os.sysconf("SC_CLK_TCK")


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids, out, todo = children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
        total += sum(int(v) for v in fields[11:15])
    return total


def status_kb(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def main() -> int:
    out, root, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    root_pid = int(root)
    before = cpu_ticks(tree(root_pid))
    peak = status_kb(tree(root_pid), "VmRSS")
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, status_kb(tree(root_pid), "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = subprocess.call(cmd)
    done.set()
    sampler.join()
    pids = tree(root_pid)
    result = {
        "cpu_s": (cpu_ticks(pids) - before) / TICK,
        "rss_peak_kb": max(peak, status_kb(pids, "VmRSS")),
        "hwm_kb": status_kb(pids, "VmHWM"),
        "processes": len(pids),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
