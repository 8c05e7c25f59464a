#!/usr/bin/env python3
"""Reads a timeline trace of one decode step (a build with -DCOOPT_TRACE, run with
COOPT_TRACE_FILE=<file>; src/cuda/step.cu) and prints, per kernel launch in stream order, when its
CTAs started, returned from pdl_wait and ended, relative to the step's first CTA, and per launch
kind the mean of: the time from the previous launch's last CTA end to this one's (what the launch
adds to the step), the hand-over (previous last end -> this launch's first return from pdl_wait),
and the tail (median CTA end -> last CTA end).

    make BUILD=build-trace CUARCH="-gencode arch=compute_90,code=sm_90 -DCOOPT_TRACE" build-trace/coopt
    COOPT_TRACE_FILE=trace.bin COOPT_TRACE_STEP=8 build-trace/coopt bench -m MODEL --device cuda -p 0 -n 16 -r 1
    python3 dev/trace.py trace.bin [--layers 3] [--sms] [--attn]

The records cost 1-2 % of a step (one atomic per CTA; before the trace kept its wait stamp out of
shared memory, 13 %: docs/BENCHMARKS.md).
Launches are told apart by kind and by start times more than 4 us apart. --sms: per GEMV kind, the
SMs its CTAs ran on, CTAs per SM (least-most) and how long before the launch's last CTA each SM's
last CTA ended (10th percentile, median, most). --attn: per attention / merge kind, the CTAs that
walked keys, the most of them on one SM at once, their wait->end times and the launch's span.
--phases: per attention kind and grid z, when its CTAs start, stamp and end after the launch before
(with -DATTN_TRACE_PHASES in CUARCH the stamp is the end of the store or the walk, paged_attn.cu).
"""
import struct
import sys
from collections import defaultdict

NAMES = {1: "gemv4", 2: "attn", 3: "merge", 4: "rope_store", 5: "argmax", 6: "embed", 7: "rmsnorm", 8: "gemv"}


def kind_name(k):
    t, arg = k & 0xFFFF, k >> 16
    n = NAMES.get(t, "k%d" % t)
    if t == 1:
        n += "%s%s/kc%d" % ("+norm" if arg & 1 else "", "+swiglu" if arg & 2 else "", arg >> 2)
    elif t == 2:
        n += "%s/kt%d/z%d" % ("/tc" if arg & 1 else "", (arg >> 1) & 0x7F, arg >> 8)
    elif arg:
        n += "/%d" % arg
    return n


def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))]


def attn_report(launches):
    """Per attention / merge launch kind, mean over its launches: CTAs that walked keys (ran more
    than 1 us after their wait), the most of them resident on one SM at once, their wait->end
    times, the spread of their starts (a second wave starts late) and the launch's span."""
    print("\n%-24s %5s %5s %6s %8s %8s %8s %8s %8s %8s" % ("attention kind", "count", "live", "perSM",
                                                          "dur p10", "p50", "p90", "start p90", "span", "wait->N"))
    per = defaultdict(list)
    for k, rs in launches:
        if (k & 0xFFFF) not in (2, 3):
            continue
        s0 = min(r[0] for r in rs)
        w0 = min((r[1] for r in rs if r[1]), default=s0)
        el = max(r[2] for r in rs)
        live = [r for r in rs if r[2] - (r[1] or r[0]) > 1000]
        if not live:
            continue
        by_sm = defaultdict(list)
        for r in live:
            by_sm[r[4]].append((r[0], r[2]))
        most = 0
        for v in by_sm.values():  # the most CTAs of this launch resident on the SM at one time
            ev = sorted([(a, 1) for a, _ in v] + [(b, -1) for _, b in v])
            cur = 0
            for _, d in ev:
                cur += d
                most = max(most, cur)
        dur = sorted((r[2] - (r[1] or r[0])) / 1000.0 for r in live)
        st = sorted((r[0] - s0) / 1000.0 for r in live)
        per[k].append((len(live), most, pct(dur, 0.1), pct(dur, 0.5), pct(dur, 0.9), pct(st, 0.9),
                       (el - s0) / 1000.0, (el - w0) / 1000.0))
    for k, v in sorted(per.items()):
        m = [sum(x[i] for x in v) / len(v) for i in range(8)]
        print("%-24s %5d %5.0f %6.1f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f" % (kind_name(k), len(v), *m))


def phase_report(launches):
    """Per attention kind and grid z, mean over its launches of the CTAs' median start, stamp and end
    (and the latest stamp and end), relative to the previous launch's last CTA end. The stamp is the
    return from pdl_wait, or in a build with -DATTN_TRACE_PHASES the end of the CTA's phase (store
    CTAs: rows stored; walking CTAs: walk done)."""
    print("\n%-24s %3s %5s %6s %8s %8s %8s %8s %8s" % ("attention kind", "z", "count", "CTAs", "start",
                                                     "stamp", "stampN", "end", "endN"))
    per = defaultdict(list)
    for i, (k, rs) in enumerate(launches):
        if (k & 0xFFFF) != 2 or i == 0:
            continue
        prev = max(r[2] for r in launches[i - 1][1])
        by_z = defaultdict(list)
        for r in rs:
            by_z[r[5]].append(r)
        for z, v in by_z.items():
            st = sorted((r[0] - prev) / 1000.0 for r in v)
            sp = sorted(((r[1] or r[0]) - prev) / 1000.0 for r in v)
            en = sorted((r[2] - prev) / 1000.0 for r in v)
            per[(k, z)].append((len(v), pct(st, 0.5), pct(sp, 0.5), sp[-1], pct(en, 0.5), en[-1]))
    for (k, z), v in sorted(per.items()):
        m = [sum(x[i] for x in v) / len(v) for i in range(6)]
        print("%-24s %3d %5d %6.1f %8.2f %8.2f %8.2f %8.2f %8.2f" % (kind_name(k), z, len(v), *m))


def main():
    path = sys.argv[1]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 3
    raw = open(path, "rb").read()
    n = struct.unpack_from("<Q", raw, 0)[0]
    recs = []
    for i in range(n):
        t0, t1, t2, ks = struct.unpack_from("<4Q", raw, 8 + 32 * i)
        k = ks & 0xFFFFFFFF
        if (k & 0xFFFF) == 2:  # attention: one launch whatever the CTA's role (z)
            k &= 0x00FFFFFF
        recs.append((t0, t1, t2, k, ks >> 32, (ks >> 24) & 0xFF))
    if not recs:
        print("no records")
        return
    base = min(r[0] for r in recs)
    by_kind = defaultdict(list)
    for r in recs:
        by_kind[r[3]].append(r)
    launches = []
    for k, rs in by_kind.items():
        rs.sort()
        cur = [rs[0]]
        for r in rs[1:]:
            if r[0] - cur[-1][0] > 4000:  # ns: a later launch of the same kernel
                launches.append((k, cur))
                cur = []
            cur.append(r)
        launches.append((k, cur))
    launches.sort(key=lambda l: min(r[0] for r in l[1]))

    def us(t):
        return (t - base) / 1000.0

    rows = []
    for k, rs in launches:
        t0 = sorted(r[0] for r in rs)
        t1 = sorted(r[1] for r in rs if r[1])
        t2 = sorted(r[2] for r in rs)
        rows.append(dict(kind=k, n=len(rs), s0=t0[0], w0=t1[0] if t1 else 0, wl=t1[-1] if t1 else 0,
                         e0=t2[0], emed=t2[len(t2) // 2], el=t2[-1], sms=len(set(r[4] for r in rs))))
    print("%-28s %5s %4s %9s %9s %9s %9s %9s %9s %7s %7s" % ("launch", "CTAs", "SMs", "start", "wait0", "waitN",
                                                         "end0", "endmed", "endN", "adds", "hand"))
    stats = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    prev = None
    shown = 0
    for i, r in enumerate(rows):
        adds = (r["el"] - prev["el"]) / 1000.0 if prev else 0.0
        hand = (r["w0"] - prev["el"]) / 1000.0 if prev and r["w0"] else float("nan")
        tail = (r["el"] - r["emed"]) / 1000.0
        s = stats[r["kind"]]
        s[0] += 1
        s[1] += adds
        s[2] += hand if hand == hand else 0.0
        s[3] += tail
        s[4] += (r["el"] - (r["w0"] or r["s0"])) / 1000.0
        if shown < 6 * layers + 2 or i >= len(rows) - 4:
            print("%-28s %5d %4d %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %7.2f %7.2f" % (
                kind_name(r["kind"]), r["n"], r["sms"], us(r["s0"]), us(r["w0"]) if r["w0"] else float("nan"),
                us(r["wl"]) if r["wl"] else float("nan"), us(r["e0"]), us(r["emed"]), us(r["el"]), adds, hand))
            shown += 1
        prev = r
    if "--sms" in sys.argv:  # per GEMV kind, mean over its launches: how the CTAs sat on the SMs
        print("\n%-28s %6s %5s %12s %24s" % ("GEMV kind", "count", "SMs", "CTAs per SM", "SM ends before last, us"))
        per = defaultdict(list)
        for k, rs in launches:
            if (k & 0xFFFF) not in (1, 8):
                continue
            by_sm = defaultdict(list)
            for r in rs:
                by_sm[r[4]].append(r)
            cnt = sorted(len(v) for v in by_sm.values())
            last = max(r[2] for r in rs)
            ends = sorted((last - max(r[2] for r in v)) / 1000.0 for v in by_sm.values())
            per[k].append((len(by_sm), cnt[0], cnt[-1], ends[len(ends) // 10], ends[len(ends) // 2], ends[-1]))
        for k, v in sorted(per.items()):
            m = [sum(x[i] for x in v) / len(v) for i in range(6)]
            print("%-28s %6d %5.1f %5.1f-%-6.1f p10 %5.2f p50 %5.2f max %5.2f" % (kind_name(k), len(v), *m))
    if "--attn" in sys.argv:
        attn_report(launches)
    if "--phases" in sys.argv:
        phase_report(launches)
    print("\nstep: %.1f us, %d launches, %d CTA records" % ((rows[-1]["el"] - base) / 1000.0, len(rows), n))
    print("%-28s %6s %9s %9s %9s %9s" % ("kind", "count", "adds", "hand", "tail", "wait->end"))
    for k, s in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        c = s[0]
        print("%-28s %6d %9.2f %9.2f %9.2f %9.2f" % (kind_name(k), c, s[1] / c, s[2] / c, s[3] / c, s[4] / c))


if __name__ == "__main__":
    main()
