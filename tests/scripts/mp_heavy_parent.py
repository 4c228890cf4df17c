"""A Python multiprocessing parent holding a large heap, with idle workers: the shape whose
SIGKILL `cargo xtask bench orphans` times (the parent's own teardown frees the heap before its
exit is reported).

usage: mp_heavy_parent.py N MIB [TAG]

Starts N workers (forked first, so they share none of the heap), then fills MIB MiB, prints
`parent=PID workers=PID,PID,...` and waits. Everything is bounded by LIFETIME seconds. TAG is
ignored: it only marks the command line for a policy to match.
"""

import multiprocessing as mp
import os
import sys
import time

LIFETIME = 120


def idle():
    time.sleep(LIFETIME)


def main():
    n, mib = int(sys.argv[1]), int(sys.argv[2])
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=idle) for _ in range(n)]
    for w in workers:
        w.start()
    heap = b"\x01" * (mib << 20)  # written, so resident
    pids = ",".join(str(w.pid) for w in workers)
    print(f"parent={os.getpid()} workers={pids} heap={len(heap)}", flush=True)
    time.sleep(LIFETIME)


if __name__ == "__main__":
    main()
