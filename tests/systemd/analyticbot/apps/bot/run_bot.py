"""The bot: a process pool for heavy jobs. On Linux the pool forks its 3 workers at the first
job; they wait on its queue for the next one and outlive a killed bot."""

import time
from concurrent.futures import ProcessPoolExecutor


def render_chart(points):
    return sum(i * i for i in range(points))


def main():
    with ProcessPoolExecutor(max_workers=3) as pool:
        while True:
            list(pool.map(render_chart, [10_000] * 3))
            time.sleep(1)


if __name__ == "__main__":
    main()
