"""bench/report.py: turns bench/.work/*.json into the Markdown tables, the PNG chart and the
last-line JSON of bench/run. Called by bench/run; reads its settings from the environment
variables bench/run exports (REPORT_*). The chart needs matplotlib (the peers' venv has it);
without it the chart is skipped with a note."""

from __future__ import annotations

import json
import os
import sys

from hostinfo import cpu_model
import targets as issue_targets

env = os.environ
work, out, stamp = env["REPORT_WORK"], env["REPORT_OUT"], env["REPORT_STAMP"]
targets = env["REPORT_TARGETS"].split()
kinds = env["REPORT_KINDS"].split()  # KIND:CONTENT_TYPE:FILE
conc = [int(c) for c in env["REPORT_CONCURRENCY"].split()]
OURS = "leuknet"




def load(path: str):
    p = os.path.join(work, path)
    return json.load(open(p)) if os.path.exists(p) else None


lines = [json.loads(l) for l in open(os.path.join(work, "raw.jsonl")) if l.strip()]
per_batch = [l for l in lines if "batch" in l]
summary = next(l for l in lines if "best_batch" in l)
raw_best = summary["best_images_per_s"]
raw_b1 = next((l for l in per_batch if l["batch"] == 1), None)
raw_single_ms = raw_b1["ms_per_batch"] if raw_b1 else None
parity = load("parity.json")
image_info = {}
if parity:
    for row in parity["inputs"]:
        image_info.setdefault(row["kind"], row["file"])

rounds = int(env.get("REPORT_ROUNDS", "1"))


def median(values: list[float]) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


# The raw engine's turns during the load (one per kind, concurrency and round): images/s.
raw_turns = {}
for spec in kinds:
    kind = spec.split(":", 1)[0]
    for c in conc:
        for r in range(1, rounds + 1):
            p = os.path.join(work, f"rawslot-{kind}-c{c}-r{r}.jsonl")
            if os.path.exists(p):
                got = [json.loads(l) for l in open(p) if l.strip()]
                turn = next((l for l in got if "best_images_per_s" in l), None)
                if turn:
                    raw_turns.setdefault(kind, []).append(turn["best_images_per_s"])
raw_during = {k: round(sum(v) / len(v), 3) for k, v in raw_turns.items()}

rows = []
for target in targets:
    for spec in kinds:
        kind, ctype, path = spec.split(":", 2)
        for c in conc:
            parts = [(load(f"oha-{target}-{kind}-c{c}-r{r}.json"),
                      load(f"proc-{target}-{kind}-c{c}-r{r}.json") or {})
                     for r in range(1, rounds + 1)]
            parts = [(d, proc) for d, proc in parts if d is not None]
            if not parts:
                continue
            ok = total_s = cpu_s = 0.0
            p50s, p99s, rss, hwm, procs = [], [], [], [], []
            non_200, errors = {}, {}
            for d, proc in parts:
                codes = {k: int(v) for k, v in d.get("statusCodeDistribution", {}).items()}
                ok += codes.get("200", 0)
                total_s += d["summary"]["total"]
                cpu_s += proc.get("cpu_s", 0.0)
                pct = d.get("latencyPercentilesSuccessful") or d["latencyPercentiles"]
                p50s.append(None if pct.get("p50") is None else pct["p50"] * 1000)
                p99s.append(None if pct.get("p99") is None else pct["p99"] * 1000)
                rss.append(proc.get("rss_peak_kb"))
                hwm.append(proc.get("hwm_kb"))
                procs.append(proc.get("processes"))
                for k, v in codes.items():
                    if k != "200":
                        non_200[k] = non_200.get(k, 0) + v
                for k, v in d.get("errorDistribution", {}).items():
                    if k != "aborted due to deadline":
                        errors[k] = errors.get(k, 0) + v
            ok = int(ok)
            ips = ok / total_s if total_s else 0.0
            p50, p99 = median(p50s), median(p99s)
            peak = lambda v: round(max(v) / 1024, 1) if all(x is not None for x in v) else None  # noqa: E731
            raw_ref = raw_during.get(kind, raw_best)
            row = {
                "server": target, "input": kind, "content_type": ctype,
                "file": os.path.basename(path), "concurrency": c, "rounds": len(parts),
                "duration_s": round(total_s, 3), "ok": ok, "images_per_s": round(ips, 3),
                "p50_ms": None if p50 is None else round(p50, 2),
                "p99_ms": None if p99 is None else round(p99, 2),
                "p50_ms_rounds": [None if x is None else round(x, 2) for x in p50s],
                "cpu_s_per_image": round(cpu_s / ok, 4) if ok and parts[0][1].get("cpu_s") is not None else None,
                "rss_peak_mb": peak(rss), "hwm_mb": peak(hwm),
                "processes": max((x or 0) for x in procs) or None,
                "over_raw": round(ips / raw_ref, 3) if raw_ref else None,
                "non_200": non_200, "errors": errors,
            }
            if target == OURS and c == 1 and row["p50_ms"] is not None and raw_single_ms:
                row["added_p50_ms"] = round(row["p50_ms"] - raw_single_ms, 2)
            rows.append(row)


def pick(target: str, kind: str, c: int | None = None) -> list[dict]:
    return [r for r in rows if r["server"] == target and r["input"] == kind
            and (c is None or r["concurrency"] == c)]


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


# Ours over each peer at the same concurrency.
for r in rows:
    if r["server"] != OURS:
        ours = pick(OURS, r["input"], r["concurrency"])
        if ours:
            r["ours_over_this"] = ratio(ours[0]["images_per_s"], r["images_per_s"])

comparison = {}
peers = [t for t in targets if t != OURS]
for spec in kinds:
    kind = spec.split(":", 1)[0]
    per = {}
    for target in targets:
        rs = pick(target, kind)
        if not rs:
            continue
        best = max(rs, key=lambda r: r["images_per_s"])
        c1 = pick(target, kind, 1)
        per[target] = {
            "best_images_per_s": best["images_per_s"], "best_concurrency": best["concurrency"],
            "cpu_s_per_image": best["cpu_s_per_image"],
            "p50_ms_c1": c1[0]["p50_ms"] if c1 else None,
            "p99_ms_c1": c1[0]["p99_ms"] if c1 else None,
            "rss_peak_mb": max((r["rss_peak_mb"] or 0) for r in rs),
            "hwm_mb": max((r["hwm_mb"] or 0) for r in rs),
        }
    entry = {"servers": per}
    pairs = load(f"pairs-{kind}.json")
    if pairs:
        entry["latency_c1_pairs"] = pairs
        for target, v in pairs["servers"].items():
            if target in per:
                per[target]["p50_ms_c1_paired"] = v["p50_ms"]
    if OURS in per:
        ours = per[OURS]
        # Against the raw engine's turns during this kind's load points (the sweep's best
        # when there were none), and, for reference, against the sweep's best.
        entry["raw_images_per_s"] = raw_during.get(kind, raw_best)
        entry["ratio_vs_raw"] = ratio(ours["best_images_per_s"], entry["raw_images_per_s"])
        entry["ratio_vs_raw_sweep"] = ratio(ours["best_images_per_s"], raw_best)
        entry["ours_over_peer"] = {
            p: {"images_per_s": ratio(ours["best_images_per_s"], per[p]["best_images_per_s"]),
                "p50_ms_c1": ratio(ours["p50_ms_c1"], per[p]["p50_ms_c1"]),
                "p50_ms_c1_paired": ratio(ours.get("p50_ms_c1_paired"),
                                          per[p].get("p50_ms_c1_paired")),
                "cpu_s_per_image": ratio(ours["cpu_s_per_image"], per[p]["cpu_s_per_image"]),
                "rss_peak_mb": ratio(ours["rss_peak_mb"], per[p]["rss_peak_mb"])}
            for p in peers if p in per}
        best_peer = max((p for p in peers if p in per),
                        key=lambda p: per[p]["best_images_per_s"], default=None)
        entry["best_peer"] = best_peer
        entry["ratio_vs_best_peer"] = (ratio(ours["best_images_per_s"],
                                             per[best_peer]["best_images_per_s"])
                                       if best_peer else None)
    comparison[kind] = entry

result = {
    "timestamp": stamp, "mode": env["REPORT_MODE"], "device": env["REPORT_DEVICE"],
    "execution_provider": summary.get("execution_provider"), "model": summary.get("model"),
    "host": {"cpus": os.cpu_count(), "cpu": cpu_model()},
    "threads": int(env["REPORT_THREADS"]),
    "load_seconds": float(env["REPORT_DURATION"]),
    "raw_seconds_per_batch": float(env["REPORT_RAW_SECONDS"]),
    "rounds": rounds,
    "raw": {"per_batch": per_batch, "best_batch": summary["best_batch"],
            "best_images_per_s": raw_best, "single_image_ms": raw_single_ms,
            "during_load": {k: {"turns_images_per_s": raw_turns[k], "mean_images_per_s": v}
                            for k, v in raw_during.items()}},
    "servers": targets,
    "parity": None if parity is None else {
        "ok": parity["ok"], "tolerance": parity["tolerance"],
        "kind_tolerance": parity.get("kind_tolerance"), "max_abs_dp": parity["per_kind"]},
    "comparison": comparison,
    "targets": issue_targets.judge(comparison, summary.get("execution_provider")),
    "rows": rows,
    # The pre-peers figures, kept under their old name for older readers.
    "server": [r for r in rows if r["server"] == OURS],
}

# ---- chart -------------------------------------------------------------------------------------
png = os.path.splitext(out)[0] + ".png"
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.split(":", 1)[0] for s in kinds]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for i, kind in enumerate(names):
        top, bottom = axes[0][i], axes[1][i]
        for target in targets:
            rs = sorted(pick(target, kind), key=lambda r: r["concurrency"])
            if not rs:
                continue
            xs = [r["concurrency"] for r in rs]
            # One colour per server in every panel (fastapi-nodraft runs on fields only).
            style = dict(marker="o", linewidth=2.5 if target == OURS else 1.5,
                         color=f"C{targets.index(target)}")
            top.plot(xs, [r["images_per_s"] for r in rs], label=target, **style)
            bottom.plot(xs, [r["p50_ms"] for r in rs], label=f"{target} p50", **style)
        top.axhline(raw_during.get(kind, raw_best), color="grey", linestyle="--",
                    label="raw ORT (best batch, during the load)")
        top.set_title(kind)
        top.set_xscale("log", base=2)
        bottom.set_xscale("log", base=2)
        bottom.set_yscale("log")
        top.set_ylabel("images/s")
        bottom.set_ylabel("p50 latency, ms")
        bottom.set_xlabel("concurrency")
        top.set_ylim(bottom=0)
        top.legend(fontsize=7)
    fig.suptitle(f"leuknet-server vs Python peers, {result['execution_provider']}, "
                 f"{result['host']['cpus']} CPUs, {stamp} ({result['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    result["chart"] = os.path.relpath(png)
except ImportError as e:
    print(f"(no chart: {e})", file=sys.stderr)

# ---- Markdown ----------------------------------------------------------------------------------
print(f"\nRaw engine ({result['execution_provider']}, {result['threads']} intra-op threads): best "
      f"{raw_best:.2f} images/s at batch {summary['best_batch']}; batch 1 takes {raw_single_ms} ms."
      + "".join(f" During the {k} load: {', '.join(f'{x:.2f}' for x in raw_turns[k])} "
                f"(mean {v:.2f})." for k, v in raw_during.items()))
if parity and any(parity["per_kind"].values()):
    print("\nParity (max |dp| against leuknet-server, all inputs of each kind): " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {v:.1e}" for n, v in d.items() if not n.startswith("local"))
        for k, d in parity["per_kind"].items()) + f" -> {'ok' if parity['ok'] else 'FAILED'}")
print("\n| input | server | concurrency | images/s | p50 ms | p99 ms | CPU s/image | peak RSS MB "
      "| ours/this |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for spec in kinds:
    kind = spec.split(":", 1)[0]
    for c in conc:
        for target in targets:
            for r in pick(target, kind, c):
                flag = "" if not r["non_200"] and not r["errors"] else " *"
                print(f"| {kind} | {target} | {c} | {r['images_per_s']:.2f}{flag} | {r['p50_ms']} | "
                      f"{r['p99_ms']} | {r['cpu_s_per_image']} | {r['rss_peak_mb']} | "
                      f"{r.get('ours_over_this', '') if target != OURS else ''} |")
print("\n| input | best images/s (" + ", ".join(targets) + ") | raw during load | "
      "ratio_vs_best_peer | ratio_vs_raw | p50 ms at c=1, in pairs (under load) | peak RSS MB |")
print("|---|---|---:|---:|---:|---|---|")
for kind, e in comparison.items():
    s = e["servers"]
    fmt = lambda key: " / ".join(str(s[t].get(key, "-")) if t in s else "-" for t in targets)  # noqa: E731
    print(f"| {kind} | {fmt('best_images_per_s')} | {e.get('raw_images_per_s')} | "
          f"{e.get('ratio_vs_best_peer')} | "
          f"{e.get('ratio_vs_raw')} | {fmt('p50_ms_c1_paired')} ({fmt('p50_ms_c1')}) | "
          f"{fmt('rss_peak_mb')} |")
print()
for r in rows:
    if "added_p50_ms" in r:
        print(f"{r['input']}, concurrency 1: leuknet p50 {r['p50_ms']} ms - raw batch-1 "
              f"{raw_single_ms} ms = {r['added_p50_ms']} ms added by HTTP, decoding and queueing")
for kind, e in comparison.items():
    for peer, v in e.get("latency_c1_pairs", {}).get("vs_ref", {}).items():
        pairs = e["latency_c1_pairs"]
        print(f"{kind}, concurrency 1 in pairs ({pairs['rounds']} rounds, "
              f"{pairs.get('gap_ms', 0):g} ms gap): "
              f"leuknet - {peer} = {v['median_diff_ms']} ms (median of paired differences, 95 % "
              f"CI {v['ci95_ms'][0]} .. {v['ci95_ms'][1]}); leuknet faster in "
              f"{v['ref_faster_share'] * 100:.0f} % of rounds")
print()
for line in issue_targets.lines(result["targets"]):
    print(line)
if any(r["non_200"] or r["errors"] for r in rows):
    print("* non-200 responses or client errors; see non_200 and errors in the JSON")
with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(f"\nsaved {os.path.relpath(out)}" + (f" and {result['chart']}" if "chart" in result else ""))
print(json.dumps(result, separators=(",", ":")))
