#!/usr/bin/env python3
"""scaling: the tables bench/scaling.sh prints, one per workload row.

    python3 bench/scaling.py RAWDIR W1 W2 ...

RAWDIR holds SIDE-W.txt files of "R<TAB>row<TAB>n<TAB>value" lines (one per
run, bench/harness.h) for the sides procpool, pthread and pool at W workers.
Each cell is the median [min-max] of its runs; the ratios are procpool's
median over the other side's (rates: above 1 is procpool faster).
Standard library only.
"""
import os
import platform
import statistics
import sys
import time

SIDES = [("procpool", "procpool"), ("pthread", "pthread"), ("pool", "Pool")]
# row id, label, unit
ROWS = [
    ("w1_map_1m", "1. map x*x, 1M ints", "items/s"),
    ("w1_map_1m_shared", "1. the 1M map, arrays in the arena", "items/s"),
    ("w1_batch_1m_shared", "1. the 1M batch map, in the arena", "items/s"),
    ("w2_map_cs1", "2. map chunksize 1, 200k no-op", "tasks/s"),
    ("w3_imap", "3. imap chunksize 1, 200k", "tasks/s"),
    ("w4_apply_async", "4. 200k apply_async, get all", "tasks/s"),
    ("w5_apply_p50_us", "5. apply round trip, p50", "us"),
    ("w6_speedup", "6. speedup over 1 worker, 20 ms tasks", "x"),
    ("w6_efficiency", "6. parallel efficiency", ""),
    ("w8_gbps", "8. 1 GiB checksum, shared mem", "GB/s"),
    ("w8_memcpy_gbps", "8. memcpy, 1 core (reference)", "GB/s"),
]


def read(path):
    runs = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4 and parts[0] == "R":
                    try:
                        runs.setdefault(parts[1], []).append(float(parts[3]))
                    except ValueError:
                        pass
    except OSError:
        pass
    return runs


def fmt(v):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def cell(values):
    if not values:
        return "-"
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def ratio(a, b):
    if not a or not b or statistics.median(b) == 0:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.3g}x"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    raw, counts = sys.argv[1], sys.argv[2:]
    data = {(s, w): read(os.path.join(raw, f"{s}-{w}.txt")) for s, _ in SIDES for w in counts}
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"procpool scaling | {cpu} | {os.cpu_count()} CPUs | Linux {platform.release()} | "
          f"Python {platform.python_version()} | {time.strftime('%Y-%m-%d %H:%M:%S')}")
    header = ["workers"] + [name for _, name in SIDES] + ["pp/pthread", "pp/Pool"]
    for row, label, unit in ROWS:
        if not any(row in data[(s, w)] for s, _ in SIDES for w in counts):
            continue
        print(f"\n{label}" + (f" ({unit})" if unit else ""))
        lines = [header]
        for w in counts:
            v = [data[(s, w)].get(row, []) for s, _ in SIDES]
            lines.append([w] + [cell(x) for x in v] + [ratio(v[0], v[1]), ratio(v[0], v[2])])
        widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
        for l in lines:
            print(" | ".join(x.rjust(widths[i]) for i, x in enumerate(l)))
    print("\nEach cell: median [min-max] of its runs; ratio = procpool median / other median.")


if __name__ == "__main__":
    main()
