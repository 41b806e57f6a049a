#!/usr/bin/env python3
"""bench_py: procpool's benchmark workloads on Python's own pools.

    python3 bench/bench_py.py pool       # multiprocessing.Pool
    python3 bench/bench_py.py executor   # concurrent.futures.ProcessPoolExecutor

Standard library only. Prints the same lines as the C programs (see
bench/harness.h): "R<TAB>row<TAB>n<TAB>value" per measured run. Python is slow
per task, so by default the per-task workloads run on fewer items than the C
sides (n is printed on every line and the table says so); their figures are
rates (items/s, tasks/s) or per-call latencies, which stay comparable.
PP_BENCH_FULL=1 runs every size exactly as the C sides do.
"""
import concurrent.futures as cf
import math
import mmap
import multiprocessing as mp
import os
import sys
import time

MIB = 1 << 20
WORDS = MIB // 8
MASK = (1 << 64) - 1


def env_int(name, default):
    s = os.environ.get(name, "")
    if not s:
        return default
    try:
        v = int(s)
        if v > 0:
            return v
    except ValueError:
        pass
    print(f"bench: ignoring {name}={s} (want a positive integer)", file=sys.stderr)
    return default


FULL = os.environ.get("PP_BENCH_FULL", "") not in ("", "0")
REPS = env_int("PP_BENCH_REPS", 5)
WORKERS = env_int("PP_BENCH_WORKERS", os.cpu_count() or 1)
ONLY = os.environ.get("PP_BENCH_ONLY", "")
SELECTED = {w.strip() for w in ONLY.replace(",", " ").split()} if ONLY else None

# Item counts: (full size, Python's default). Rates are comparable across n.
SIZES = {
    "w1_map_1m": (1_000_000, 1_000_000),
    "w1_map_10m": (10_000_000, 2_000_000),
    # Workloads 2, 3, 4 run Pool at the C sides' size: their targets are a
    # ratio to Pool, and Pool's rate depends on n (200,000 handles outstanding
    # cost it GC time 20,000 do not: workload 4, 36-39 k/s against 37-51 k/s).
    "noop": (200_000, 200_000),
    "w5_apply": (20_000, 2_000),
    "w6_tasks": (200, 40),
    "w8_mib": (1024, 256),
}
# ProcessPoolExecutor handles a task ~4x slower than Pool: fewer no-op tasks
# (at 200,000 it alone would take most of the suite's five minutes).
EXECUTOR_SIZES = {"noop": 5_000}
API = sys.argv[1] if len(sys.argv) > 1 else ""


def size(key):
    full, small = SIZES[key]
    if API == "executor":
        small = EXECUTOR_SIZES.get(key, small)
    if key == "w6_tasks":
        return env_int("PP_BENCH_W6_TASKS", full if FULL else small)
    if key == "w8_mib":
        return env_int("PP_BENCH_W8_MIB", full if FULL else small)
    return full if FULL else small


# ---- tasks (mirror bench/harness.c) ------------------------------------------

def task_square(x):
    return x * x


def task_noop(x):
    return None


def task_spin(seconds):
    """Burns `seconds` of this thread's CPU time (CPU time, as the C side)."""
    end = time.thread_time() + seconds
    spins = 0
    while time.thread_time() < end:
        spins += 1
    return spins


BUF = None  # workload 8's shared mapping, inherited by forked workers


def task_checksum(block):
    """Sum of the block's 64-bit words, modulo 2**64."""
    words = memoryview(BUF).cast("Q")
    return sum(words[block * WORDS:(block + 1) * WORDS]) & MASK


# ---- the two APIs behind one face ---------------------------------------------

CTX = mp.get_context("fork")  # Linux's default in 3.11, named so workload 8 works


class PoolSide:
    name = "pool"

    def __init__(self, workers):
        self.p = CTX.Pool(workers)

    def map(self, fn, args, chunksize=None):
        return self.p.map(fn, args, chunksize)

    def imap(self, fn, args, chunksize, ordered):
        if ordered:
            return self.p.imap(fn, args, chunksize)
        return self.p.imap_unordered(fn, args, chunksize)

    def submit_all_get_all(self, fn, args):
        handles = [self.p.apply_async(fn, (a,)) for a in args]
        return [h.get() for h in handles]

    def apply(self, fn, arg):
        return self.p.apply(fn, (arg,))

    def close_join(self):
        self.p.close()
        self.p.join()


class ExecutorSide:
    name = "executor"

    def __init__(self, workers):
        self.workers = workers
        self.ex = cf.ProcessPoolExecutor(workers, mp_context=CTX)

    def map(self, fn, args, chunksize=None):
        if chunksize is None:  # Pool's rule, since the executor's default is 1
            chunksize = max(1, math.ceil(len(args) / (4 * self.workers)))
        return list(self.ex.map(fn, args, chunksize=chunksize))

    def imap(self, fn, args, chunksize, ordered):
        if ordered:
            return self.ex.map(fn, args, chunksize=chunksize)
        futures = [self.ex.submit(fn, a) for a in args]
        return (f.result() for f in cf.as_completed(futures))

    def submit_all_get_all(self, fn, args):
        futures = [self.ex.submit(fn, a) for a in args]
        return [f.result() for f in futures]

    def apply(self, fn, arg):
        return self.ex.submit(fn, arg).result()

    def close_join(self):
        self.ex.shutdown(wait=True)


# ---- output -----------------------------------------------------------------

def result(row, n, value):
    print(f"R\t{row}\t{n}\t{value:.6g}", flush=True)


def progress(side, what):
    print(f"  [{side}] {what}", file=sys.stderr, flush=True)


def selected(w):
    return SELECTED is None or str(w) in SELECTED


# ---- workloads ----------------------------------------------------------------

def w1(side, pool):
    for row in ("w1_map_1m", "w1_map_10m"):
        n = size(row)
        progress(side.name, f"{row} (n={n})")
        args = list(range(n))
        for r in range(-1, REPS):
            t0 = time.perf_counter()
            out = pool.map(task_square, args)
            t = time.perf_counter() - t0
            assert out[-1] == (n - 1) * (n - 1)
            del out
            if r >= 0:
                result(row, n, n / t)


def w2(side, pool):
    n = size("noop")
    progress(side.name, f"w2_map_cs1 (n={n})")
    args = list(range(n))
    for r in range(-1, REPS):
        t0 = time.perf_counter()
        pool.map(task_noop, args, 1)
        t = time.perf_counter() - t0
        if r >= 0:
            result("w2_map_cs1", n, n / t)


def w3(side, pool):
    n = size("noop")
    args = list(range(n))
    for ordered, row in ((True, "w3_imap"), (False, "w3_imap_unordered")):
        progress(side.name, f"{row} (n={n})")
        for r in range(-1, REPS):
            t0 = time.perf_counter()
            got = 0
            for _ in pool.imap(task_noop, args, 1, ordered):
                got += 1
            t = time.perf_counter() - t0
            assert got == n
            if r >= 0:
                result(row, n, n / t)


def w4(side, pool):
    n = size("noop")
    progress(side.name, f"w4_apply_async (n={n})")
    args = list(range(n))
    for r in range(-1, REPS):
        t0 = time.perf_counter()
        pool.submit_all_get_all(task_noop, args)
        t = time.perf_counter() - t0
        if r >= 0:
            result("w4_apply_async", n, n / t)


def percentile(sorted_values, p):
    rank = max(1, min(len(sorted_values), math.ceil(p * len(sorted_values))))
    return sorted_values[rank - 1]


def w5(side, pool):
    n = size("w5_apply")
    progress(side.name, f"w5_apply (n={n})")
    clock = time.perf_counter_ns
    for i in range(max(100, n // 20)):
        pool.apply(task_noop, i)
    for _ in range(REPS):
        lat = []
        for i in range(n):
            t0 = clock()
            pool.apply(task_noop, i)
            lat.append(clock() - t0)
        lat.sort()
        result("w5_apply_p50_us", n, percentile(lat, 0.50) / 1e3)
        result("w5_apply_p99_us", n, percentile(lat, 0.99) / 1e3)


def w6(side_cls):
    """Fresh pools each run, one at a time, as bench/harness.c does."""
    n = size("w6_tasks")
    progress(side_cls.name, f"w6_cpu (n={n}, 1 worker, then all)")
    args = [0.020] * n
    for _ in range(REPS):
        t = []
        for workers in (1, WORKERS):
            p = side_cls(workers)
            try:
                t0 = time.perf_counter()
                p.map(task_spin, args, 1)
                t.append(time.perf_counter() - t0)
            finally:
                p.close_join()
        result("w6_rate_all", n, n / t[1])
        result("w6_speedup", n, t[0] / t[1])
        result("w6_efficiency", n, t[0] / t[1] / WORKERS)


def w7(side_cls):
    progress(side_cls.name, "w7_start / w7_close_join")
    for r in range(-1, 2 * REPS):
        t0 = time.perf_counter()
        p = side_cls(WORKERS)
        p.apply(task_noop, 1)
        t1 = time.perf_counter()
        p.close_join()
        t2 = time.perf_counter()
        if r >= 0:
            result("w7_start_ms", 1, (t1 - t0) * 1e3)
            result("w7_close_join_ms", 1, (t2 - t1) * 1e3)


def w8_prepare(mib):
    """The shared mapping, made before any pool so that workers inherit it.
    Word 0 of block b is b, word j > 0 is j, as in bench/harness.c."""
    global BUF
    BUF = mmap.mmap(-1, mib * MIB)  # anonymous MAP_SHARED
    words = memoryview(BUF).cast("Q")
    block = memoryview(bytearray(MIB)).cast("Q")
    for j in range(WORDS):
        block[j] = j
    for b in range(mib):
        words[b * WORDS:(b + 1) * WORDS] = block
        words[b * WORDS] = b
    del words, block


def w8(side, pool, mib):
    progress(side.name, f"w8_large_data ({mib} MiB)")
    base = WORDS * (WORDS - 1) // 2
    blocks = list(range(mib))
    for r in range(-1, REPS):
        t0 = time.perf_counter()
        sums = pool.map(task_checksum, blocks)
        t = time.perf_counter() - t0
        if any(s != (base + b) & MASK for b, s in enumerate(sums)):
            print("E\tw8_gbps\twrong checksum", flush=True)
            return
        if r >= 0:
            result("w8_gbps", mib * MIB, mib * MIB / t / 1e9)


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("pool", "executor"):
        print(f"usage: {sys.argv[0]} pool|executor", file=sys.stderr)
        return 2
    side_cls = PoolSide if sys.argv[1] == "pool" else ExecutorSide
    print(f"I\tside\t{side_cls.name}")
    print(f"I\tworkers\t{WORKERS}")
    print(f"I\tcpus\t{os.cpu_count()}")
    print(f"I\treps\t{REPS}", flush=True)
    start = time.perf_counter()
    if selected(7):
        w7(side_cls)
    mib = size("w8_mib")
    if selected(8):
        w8_prepare(mib)
    if selected(6):
        w6(side_cls)
    if not any(selected(w) for w in (1, 2, 3, 4, 5, 8)):
        print(f"I\tseconds\t{time.perf_counter() - start:.1f}", flush=True)
        return 0
    pool = side_cls(WORKERS)
    try:
        if selected(1):
            w1(side_cls, pool)
        if selected(2):
            w2(side_cls, pool)
        if selected(3):
            w3(side_cls, pool)
        if selected(4):
            w4(side_cls, pool)
        if selected(5):
            w5(side_cls, pool)
        if selected(8):
            w8(side_cls, pool, mib)
    finally:
        pool.close_join()
    print(f"I\tseconds\t{time.perf_counter() - start:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
