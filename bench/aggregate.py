#!/usr/bin/env python3
"""aggregate: turns the lines the benchmark programs print into one table.

    python3 bench/aggregate.py [--out FILE] [--seconds S] SIDE=FILE...

Each FILE holds one side's "R<TAB>row<TAB>n<TAB>value" lines (one per run;
see bench/harness.h). SIDE names the column; "procpool" is the side every
ratio is taken against. Sides come out in the order given, so adding a column
(a spawn start method, an MPI backend: issue 7) is one more SIDE=FILE, and
adding a row is one more entry in ROWS below plus the line that prints it.
Standard library only.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

GIB = 1 << 30

# id, label, unit, size group (for the "ran on fewer items" notes), nominal n
ROWS = [
    ("w1_map_1m", "1. map x*x, 1M ints", "items/s", "w1_1m", 1_000_000),
    ("w1_map_10m", "1. map x*x, 10M ints", "items/s", "w1_10m", 10_000_000),
    ("w1_map_1m_shared", "1. the 1M map, arrays in the arena", "items/s", "w1_1ms", 1_000_000),
    ("w1_batch_1m", "1. map x*x, 1M ints, batch task", "items/s", "w1b_1m", 1_000_000),
    ("w1_batch_10m", "1. map x*x, 10M ints, batch task", "items/s", "w1b_10m", 10_000_000),
    ("w1_batch_1m_shared", "1. the 1M batch map, in the arena", "items/s", "w1b_1ms", 1_000_000),
    ("w2_map_cs1", "2. map chunksize 1, 200k no-op", "tasks/s", "noop2", 200_000),
    ("w3_imap", "3. imap chunksize 1, 200k", "tasks/s", "noop3", 200_000),
    ("w3_imap_unordered", "3. imap_unordered cs 1, 200k", "tasks/s", "noop3u", 200_000),
    ("w4_apply_async", "4. 200k apply_async, get all", "tasks/s", "noop4", 200_000),
    ("w5_apply_p50_us", "5. apply round trip, p50", "us", "w5", 20_000),
    ("w5_apply_p99_us", "5. apply round trip, p99", "us", "w5", 20_000),
    ("w6_rate_all", "6. 20 ms CPU tasks, all workers", "tasks/s", "w6", 200),
    ("w6_speedup", "6. speedup, 1 worker -> all", "x", "w6", 200),
    ("w6_efficiency", "6. parallel efficiency", "", "w6", 200),
    ("w7_start_ms", "7. start-up to first result", "ms", "w7", 1),
    ("w7_close_join_ms", "7. close + join", "ms", "w7", 1),
    ("w8_gbps", "8. 1 GiB checksum, shared mem", "GB/s", "w8", GIB),
    ("w8_memcpy_gbps", "8. memcpy, 1 core (reference)", "GB/s", "w8m", GIB),
]
ROW_IDS = {r[0] for r in ROWS}

TITLES = {  # column titles; the legend under the table spells them out
    "procpool": "procpool",
    "pool": "Pool",
    "executor": "Executor",
    "pthread": "pthread",
    "serial": "serial",
    "procpool-mpi": "pp-MPI",
    "procpool-spawn": "pp-spawn",
    "procpool-static": "pp-static",
}


def parse(path):
    """Returns (values: row -> [float], sizes: row -> n, errors: row -> msg, info)."""
    values, sizes, errors, info = {}, {}, {}, {}
    if not path or not os.path.exists(path):
        return values, sizes, {"side": "no output"}, info
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "R" and len(parts) == 4:
                try:
                    v = float(parts[3])
                except ValueError:
                    continue
                values.setdefault(parts[1], []).append(v)
                sizes[parts[1]] = int(parts[2])
            elif parts[0] == "E" and len(parts) >= 3:
                errors.setdefault(parts[1], "\t".join(parts[2:]))
            elif parts[0] == "I" and len(parts) >= 3:
                info[parts[1]] = parts[2]
    return values, sizes, errors, info


def si(v):
    """Three significant figures with k / M / G."""
    for scale, limit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e3, 1e4, "k")):
        if abs(v) >= limit:
            return f"{v / scale:.3g}{suffix}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def med(vals):
    return statistics.median(vals) if vals else None


class Side:
    def __init__(self, name, path):
        self.name = name
        self.title = TITLES.get(name, name)
        self.values, self.sizes, self.errors, self.info = parse(path)

    def median(self, row):
        return med(self.values.get(row, []))

    def cell(self, row, nominal):
        vals = self.values.get(row)
        if not vals:
            if row in self.errors or "side" in self.errors or f"workload {row[1]}" in self.errors:
                return "error"
            return "-"
        mark = "*" if self.sizes.get(row, nominal) != nominal else ""
        want = self.reps() * (2 if row.startswith("w7") else 1)
        if len(vals) < want:
            mark += f" ({len(vals)} run{'s' if len(vals) > 1 else ''})"
        return f"{si(med(vals))} [{si(min(vals))}-{si(max(vals))}]{mark}"

    def reps(self):
        try:
            return int(self.info.get("reps", "5"))
        except ValueError:
            return 5


def workers_of(side):
    try:
        return int(side.info.get("workers", ""))
    except ValueError:
        return os.cpu_count() or 1


def targets(pp, by_name):
    """row -> (text, met: True/False/None)."""
    pool, pthread = by_name.get("pool"), by_name.get("pthread")
    out = {}

    def ratio(row, other):
        a, b = pp.median(row), other.median(row) if other else None
        return a / b if a is not None and b else None

    for row in ("w1_map_1m", "w1_map_10m"):
        r = ratio(row, pool)
        out[row] = (">=100x Pool", None if r is None else r >= 100)
    # No Python side shares memory this way: against Pool's 1M map.
    m, p1 = pp.median("w1_map_1m_shared"), pool.median("w1_map_1m") if pool else None
    if m is not None and p1:
        out["w1_map_1m_shared"] = (f">=100x Pool's 1M ({m / p1:.0f}x)", m / p1 >= 100)
    # Python's Pool has no batch task: against its map of the same size.
    for row, base in (("w1_batch_1m", "w1_map_1m"), ("w1_batch_10m", "w1_map_10m"),
                      ("w1_batch_1m_shared", "w1_map_1m")):
        m, p = pp.median(row), pool.median(base) if pool else None
        if m is not None and p:
            out[row] = (f">=100x Pool's map ({m / p:.0f}x)", m / p >= 100)
    for row in ("w2_map_cs1", "w3_imap", "w3_imap_unordered", "w4_apply_async"):
        r1, r2 = ratio(row, pool), ratio(row, pthread)
        met = None if r1 is None or r2 is None else (r1 >= 100 and r2 >= 1)
        out[row] = (">=100x Pool, >=1x pthread", met)
    for row, limit, text in (("w5_apply_p50_us", 10, "<= 10 us"),
                             ("w5_apply_p99_us", 50, "<= 50 us"),
                             ("w7_start_ms", 5, "<= 5 ms"),
                             ("w7_close_join_ms", 5, "<= 5 ms")):
        m = pp.median(row)
        out[row] = (text, None if m is None else m <= limit)
    m = pp.median("w6_efficiency")
    out["w6_efficiency"] = (">= 0.97", None if m is None else m >= 0.97)
    memcpy = pp.median("w8_memcpy_gbps")
    if memcpy is None and pthread:
        memcpy = pthread.median("w8_memcpy_gbps")
    m, w = pp.median("w8_gbps"), workers_of(pp)
    if memcpy is not None:
        need = 0.5 * memcpy * w
        out["w8_gbps"] = (f">= {need:.3g} (50% memcpy x{w})", None if m is None else m >= need)
    return out


def table(sides, seconds):
    by_name = {s.name: s for s in sides}
    pp = by_name.get("procpool") or Side("procpool", None)
    others = [s for s in sides if s is not pp]
    tg = targets(pp, by_name)

    header = ["workload", "unit"] + [s.title for s in sides]
    short = [s.title[:4] for s in others]  # the whole title where four letters clash
    header += [f"pp/{t if short.count(t) == 1 else s.title}" for s, t in zip(others, short)]
    header += ["target", "met?"]
    lines = []
    for row, label, unit, _, nominal in ROWS:
        if not any(row in s.values or row in s.errors for s in sides):
            continue
        cells = [label, unit] + [s.cell(row, nominal) for s in sides]
        a = pp.median(row)
        for s in others:
            b = s.median(row)
            cells.append(f"{a / b:.3g}x" if a is not None and b else "-")
        text, met = tg.get(row, ("", None))
        verdict = "" if not text else {True: "yes", False: "no", None: "n/a"}[met]
        if met is not None and len(pp.values.get(row, [])) < pp.reps():
            verdict += "?"  # fewer runs than asked for
        cells += [text, verdict]
        lines.append(cells)

    widths = [max(len(c[i]) for c in [header] + lines) for i in range(len(header))]
    sep = "-+-".join("-" * w for w in widths)

    def fmt(cells):
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w) if i < len(cells) - 2 else
                          c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), sep] + [fmt(c) for c in lines]

    reps = {s.info.get("reps") for s in sides if s.info.get("reps")}
    w = workers_of(pp) if pp.info else workers_of(sides[0]) if sides else 0
    out.append("")
    out.append("Pool = multiprocessing.Pool, Executor = concurrent.futures.ProcessPoolExecutor "
               "(both fork), pthread = bench/pthread_pool.c, serial = a plain loop.")
    if any(s.name == "procpool-mpi" for s in sides):
        out.append("pp-MPI = procpool with PP_BACKEND_MPI under mpirun -n 2: rank 0 holds the "
                   "pool, one serving rank runs the workers (workloads 1-4).")
    if any(s.name == "procpool-static" for s in sides):
        out.append("pp-static = the procpool program linked to libprocpool.a: its item loop beside "
                   "the task (workload 1).")
    if any(s.name == "procpool-spawn" for s in sides):
        out.append("pp-spawn = procpool with PP_START_SPAWN: the zygote is a fresh run of the "
                   "program (workload 7).")
    out.append(f"Each cell: median [min-max] of {'/'.join(sorted(reps)) or '?'} runs "
               f"(workload 7: twice as many); workers = {w}; "
               "ratio = procpool median / other median "
               "(rates: >1 is procpool faster; us and ms: <1 is).")
    notes = []
    for s in sides:
        small = {}
        for row, label, unit, group, nominal in ROWS:
            n = s.sizes.get(row)
            if n is not None and n != nominal and group not in small:
                what = f"{n >> 20} MiB" if group.startswith("w8") else f"n={si(n)}"
                small[group] = f"{label} on {what}"
        if small:
            notes.append(f"  {s.title}: " + "; ".join(small.values()))
    if notes:
        out.append("* smaller runs (figures are rates or per-call, so still comparable):")
        out.extend(notes)
    for s in sides:
        for row, msg in s.errors.items():
            out.append(f"! {s.title}, {row}: {msg}")
    if seconds is not None:
        out.append(f"Suite run time: {seconds:.0f} s")
    return "\n".join(out)


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rev = ""
    try:
        rev = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)),
                              "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"{platform.node()} | {model or platform.processor()} | {os.cpu_count()} CPUs | "
            f"commit {rev or '?'} | "
            f"Linux {platform.release()} | Python {platform.python_version()} | "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write table and raw runs here")
    ap.add_argument("--seconds", type=float, help="suite run time to report")
    ap.add_argument("--load", help="1-minute load average before and after the runs")
    ap.add_argument("--pingpong", help="W:NS ...: a cache line's round trip between CPU 0 "
                    "and CPU 1 just before workload W")
    ap.add_argument("sides", nargs="+", metavar="SIDE=FILE")
    a = ap.parse_args()
    sides = []
    for spec in a.sides:
        name, _, path = spec.partition("=")
        sides.append(Side(name, path))
    text = table(sides, a.seconds)
    if a.load:
        text += f"\nLoad average (1 min) before / after: {' / '.join(a.load.split())}"
        try:
            if float(a.load.split()[0]) > 0.5:
                text += ("\nWARNING: the machine was busy when the suite started; "
                         "figures are noisier and slower than on an idle machine.")
        except ValueError:
            pass
    if a.pingpong and a.pingpong.split():
        pairs = ", ".join(f"{w} {ns} ns" for w, _, ns in
                          (p.partition(":") for p in a.pingpong.split()))
        text += ("\nCache line round trip CPU 0 <-> CPU 1 before each workload: " + pairs +
                 " (on a VM it can change several-fold from one moment to the next, and "
                 "the rates of workloads 2-5 on every side with it: docs/performance.md)")
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("procpool benchmark results\n" + machine() + "\n\n" + text + "\n\n")
            f.write("Raw runs (side, row, n, values in run order):\n")
            for s in sides:
                for k, v in s.info.items():
                    f.write(f"  {s.name}\tinfo\t{k}\t{v}\n")
                for row, vals in s.values.items():
                    f.write(f"  {s.name}\t{row}\t{s.sizes.get(row)}\t"
                            + " ".join(f"{x:.6g}" for x in vals) + "\n")
        print(f"(written to {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
