"""bench/preprocess_report.py: runs and reports bench/preprocess.

  preprocess_report.py run FILE...   starts leuknet-bench-preprocess --serve and
      bench/peers/preprocess_pillow.py --serve, and asks them in turn for short bursts (each
      round, each file, each path; the order of the paths rotates every round), appending one
      JSON line per burst to PP_OUT_JSONL
  preprocess_report.py report        the table and last-line JSON from those lines

Settings come from the PP_* environment variables bench/preprocess sets."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from hostinfo import cpu_model

env = os.environ
PATHS = ["ours", "plain", "draft", "peer"]
# With PP_GLOBAL_RAYON=1: also ours as before the decoding threads became one-thread rayon pools.
if env.get("PP_GLOBAL_RAYON") == "1":
    PATHS.append("ours_global_rayon")


def kind_of(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


def run(files: list[str]) -> None:
    ours = subprocess.Popen([env["PP_OURS_BIN"], "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    before = None
    if "ours_global_rayon" in PATHS:
        before = subprocess.Popen([env["PP_OURS_BIN"], "--serve", "--global-rayon"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    here = os.path.dirname(os.path.abspath(__file__))
    pillow = subprocess.Popen([env["PP_PYTHON"], os.path.join(here, "peers", "preprocess_pillow.py"),
                               "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(proc: subprocess.Popen, line: str) -> dict:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        if not answer:
            sys.exit(f"bench/preprocess: the measuring process stopped (request {line!r})")
        return json.loads(answer)

    rounds = int(env["PP_ROUNDS"])
    with open(env["PP_OUT_JSONL"], "w") as out:
        for r in range(rounds):
            print(f"bench/preprocess: round {r + 1}/{rounds}", file=sys.stderr)
            for f in files:
                n = env["PP_FIELD_ITERATIONS"] if kind_of(f) == "fields" else env["PP_ITERATIONS"]
                order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
                for p in order:
                    if p == "ours":
                        row = ask(ours, f"{n} {f}")
                    elif p == "ours_global_rayon":
                        row = ask(before, f"{n} {f}")
                        row["path"] = p
                    else:
                        row = ask(pillow, f"{p} {n} {f}")
                    row["round"] = r
                    out.write(json.dumps(row) + "\n")
    for proc in [x for x in (ours, pillow, before) if x]:
        proc.stdin.close()
        proc.wait(timeout=60)


LABELS = {
    "ours": "ours (leuknet)",
    "plain": "Pillow plain",
    "draft": "Pillow draft",
    "peer": "peer pipeline",
    "ours_global_rayon": "ours, rayon global pool (before)",
}




def pillow_version() -> str:
    try:
        import PIL

        return PIL.__version__
    except ImportError:
        return "unknown"


def report() -> None:
    rows = [json.loads(line) for line in open(env["PP_IN"]) if line.strip()]
    kinds = []
    for r in rows:
        k = kind_of(r["file"])
        if k not in kinds:
            kinds.append(k)

    result = {}
    for kind in kinds:
        entry = {}
        sample = next(r for r in rows if kind_of(r["file"]) == kind)
        entry["image"] = {"width": sample["width"], "height": sample["height"], "format": sample["format"]}
        entry["files"] = sorted({r["file"] for r in rows if kind_of(r["file"]) == kind})
        for p in PATHS:
            meds = [r["cpu_ms_median"] for r in rows if kind_of(r["file"]) == kind and r["path"] == p]
            if meds:
                entry[p] = {
                    "cpu_ms": round(statistics.median(meds), 4),
                    "cpu_ms_min": round(min(meds), 4),
                    "cpu_ms_max": round(max(meds), 4),
                    "samples": len(meds),
                }
        ours = entry.get("ours", {}).get("cpu_ms")
        for p in ("plain", "draft", "peer", "ours_global_rayon"):
            if ours and p in entry:
                entry[f"ours_over_{p}"] = round(ours / entry[p]["cpu_ms"], 3)
        checks = {}
        if "ours_over_draft" in entry:
            checks["faster_than_pillow_draft"] = entry["ours_over_draft"] < 1.0
        if kind == "fields" and "ours_over_plain" in entry:
            checks["at_most_quarter_of_pillow_plain"] = entry["ours_over_plain"] <= 0.25
        entry["targets"] = checks
        result[kind] = entry

    header = "| input | " + " | ".join(f"{LABELS[p]} CPU ms" for p in PATHS) + \
        " | ours/plain | ours/draft | targets |"
    print(f"\nCPU milliseconds per image, decode + resize to 224x224 + normalise (median of "
          f"per-burst medians; {env['PP_ROUNDS']} rounds of alternating bursts):\n")
    print(header)
    print("|" + "---|" * (len(PATHS) + 4))
    for kind, e in result.items():
        img = e["image"]
        cells = [f"{e[p]['cpu_ms']:.3f}" if p in e else "-" for p in PATHS]
        verdict = ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in e["targets"].items())
        print(f"| {kind} ({img['width']}x{img['height']} {img['format']}) | " + " | ".join(cells)
              + f" | {e.get('ours_over_plain', '-')} | {e.get('ours_over_draft', '-')} | {verdict} |")
    print("\nTargets (issue 5): ours <= 1/4 of Pillow plain on 2592x1944 JPEGs; ours faster than "
          "Pillow draft on every input.")
    print(f"Machine load (1, 5, 15 min) before: {env['PP_LOAD_BEFORE']}, after: {env['PP_LOAD_AFTER']}")

    doc = {
        "timestamp": env["PP_STAMP"],
        "benchmark": "preprocess",
        "host": {"cpus": os.cpu_count(), "cpu": cpu_model()},
        "load_before": env["PP_LOAD_BEFORE"],
        "load_after": env["PP_LOAD_AFTER"],
        "rounds": int(env["PP_ROUNDS"]),
        "iterations_per_round": {"cells": int(env["PP_ITERATIONS"]), "aria": int(env["PP_ITERATIONS"]),
                                 "fields": int(env["PP_FIELD_ITERATIONS"])},
        "pillow": pillow_version(),
        "ours_bin": env.get("PP_OURS_BIN"),
        "kinds": result,
        "all_targets_pass": all(v for e in result.values() for v in e["targets"].values()),
    }
    with open(env["PP_OUT"], "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(json.dumps(doc, separators=(",", ":")))


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2:])
    else:
        report()
