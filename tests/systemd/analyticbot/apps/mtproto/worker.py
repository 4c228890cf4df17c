"""The MTProto collector: 3 multiprocessing workers started with fork, which carry the
collector's command line and outlive a killed collector."""

import argparse
import multiprocessing
import time


def collect(shard):
    while True:
        time.sleep(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=int, default=10)
    args = parser.parse_args()
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=collect, args=(shard,)) for shard in range(3)]
    for worker in workers:
        worker.start()
    while True:
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
