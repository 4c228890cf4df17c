"""Starts worker processes the way Python services do, prints their pids, then waits.

usage: mp_workers.py START_METHOD N [process|pool|executor]

Prints one line: `parent=PID workers=PID,PID,...`. The workers sit idle (like pool workers
waiting for tasks) until killed; everything is bounded by LIFETIME seconds.
"""

import concurrent.futures
import multiprocessing as mp
import os
import sys
import time

LIFETIME = 120


def idle():
    time.sleep(LIFETIME)


def own_pid(_):
    return os.getpid()


def main():
    method, n = sys.argv[1], int(sys.argv[2])
    kind = sys.argv[3] if len(sys.argv) > 3 else "process"
    ctx = mp.get_context(method)
    keep = None
    if kind == "pool":
        keep = ctx.Pool(n)
        pids = [p.pid for p in keep._pool]
    elif kind == "executor":
        keep = concurrent.futures.ProcessPoolExecutor(max_workers=n, mp_context=ctx)
        # Executors start workers lazily; make them all start and report.
        list(keep.map(own_pid, range(n * 4)))
        pids = list(keep._processes.keys())
    else:
        keep = [ctx.Process(target=idle, daemon=False) for _ in range(n)]
        for p in keep:
            p.start()
        pids = [p.pid for p in keep]
    print(f"parent={os.getpid()} workers={','.join(map(str, pids))}", flush=True)
    time.sleep(LIFETIME)


if __name__ == "__main__":
    main()
