"""Starts worker processes the way Python services do, prints their pids, then waits.

usage: mp_workers.py START_METHOD N [process|pool|executor] [TAG]

Prints one line, `parent=PID workers=PID,PID,...`, once every worker is busy running one long
task (as a leaked worker is in production). Everything is bounded by LIFETIME seconds. TAG is
ignored: it only marks the command line for a policy to match.
"""

import concurrent.futures
import multiprocessing as mp
import os
import sys
import time

LIFETIME = 120
started = None


def init(queue):
    global started
    started = queue


def busy(_=None):
    started.put(os.getpid())
    time.sleep(LIFETIME)


def run(queue):
    init(queue)
    busy()


def main():
    method, n = sys.argv[1], int(sys.argv[2])
    kind = sys.argv[3] if len(sys.argv) > 3 else "process"
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    if kind == "pool":
        keep = ctx.Pool(n, initializer=init, initargs=(queue,))
        keep.map_async(busy, range(n), chunksize=1)
    elif kind == "executor":
        keep = concurrent.futures.ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=init, initargs=(queue,)
        )
        for _ in range(n):
            keep.submit(busy)
    else:
        keep = [ctx.Process(target=run, args=(queue,)) for _ in range(n)]
        for p in keep:
            p.start()
    pids = sorted(queue.get(timeout=60) for _ in range(n))
    print(f"parent={os.getpid()} workers={','.join(map(str, pids))}", flush=True)
    time.sleep(LIFETIME)


if __name__ == "__main__":
    main()
