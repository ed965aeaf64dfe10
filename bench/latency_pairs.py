"""bench/latency_pairs.py: latency at concurrency 1, measured in pairs.

One request at a time, the servers in turn (the order rotating every round), each over its own
kept-alive connection, N rounds per input file. A server's latency is the time from sending the
request to having read the whole answer. Because every round asks every server within a second
or so, a change in the machine's speed (other work, CPU frequency) hits all of them alike, and
the per-round differences (ours minus a peer) measure what the services add, not the weather.

Each request waits `--gap-ms` first (the harness uses 200): ONNX Runtime's intra-op threads keep
spinning for some tens of milliseconds after a run, so a request sent to one server the moment
another has answered shares the two cores with that server's spinning threads. Measured on this
2-core VM (one TIFF cell, leuknet-server vs FastAPI vs leuknet-server without spinning): with no
gap every server's p50 was 160-185 ms and depended on which server it followed; with 80 or 300 ms
all three were 146-149 ms, the same as back-to-back requests to one server alone.

Prints one JSON object: per server p50/p90/mean ms; per peer the median of the paired
differences with a 95 % bootstrap interval, and the share of rounds in which ours was faster.

  latency_pairs.py --rounds 60 --ref leuknet=http://127.0.0.1:8000/v1/classify \
      --peer fastapi=http://127.0.0.1:8001/v1/classify --type image/jpeg FILE
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import time
import urllib.parse


class Client:
    """One kept-alive HTTP/1.1 connection to one server (reopened if the server closes it)."""

    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = u.hostname, u.port, u.path
        self.conn = None

    def post(self, body: bytes, ctype: str) -> float:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                start = time.perf_counter()
                self.conn.request("POST", self.path, body=body, headers={
                    "Content-Type": ctype, "Content-Length": str(len(body))})
                resp = self.conn.getresponse()
                resp_body = resp.read()
                elapsed = (time.perf_counter() - start) * 1000
                if resp.status != 200:
                    raise SystemExit(f"{self.host}:{self.port}{self.path}: HTTP {resp.status}: "
                                     f"{resp_body[:200]!r}")
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return elapsed
            except (http.client.HTTPException, ConnectionError):
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="NAME=URL of the server compared with the others")
    ap.add_argument("--peer", action="append", default=[], help="NAME=URL (repeatable)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3, help="rounds not counted")
    ap.add_argument("--type", default="application/octet-stream", help="Content-Type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="pause before every request, so that it arrives at a quiet machine")
    ap.add_argument("file")
    a = ap.parse_args()
    body = open(a.file, "rb").read()
    named = [tuple(s.split("=", 1)) for s in [a.ref, *a.peer]]
    names = [n for n, _ in named]
    clients = {n: Client(u) for n, u in named}
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.warmup + a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {}
        for n in order:
            if a.gap_ms > 0:
                time.sleep(a.gap_ms / 1000)
            got[n] = clients[n].post(body, a.type)
        if r >= a.warmup:
            for n in names:
                ms[n].append(got[n])
    ref = names[0]
    rng = random.Random(a.seed)
    out = {"file": a.file, "rounds": a.rounds, "gap_ms": a.gap_ms, "ref": ref, "servers": {}, "vs_ref": {}}
    for n in names:
        out["servers"][n] = {"p50_ms": round(statistics.median(ms[n]), 2),
                             "p90_ms": round(statistics.quantiles(ms[n], n=10, method="inclusive")[8], 2),
                             "mean_ms": round(statistics.fmean(ms[n]), 2)}
    for n in names[1:]:
        diff = [x - y for x, y in zip(ms[ref], ms[n])]
        boot = sorted(statistics.median(rng.choices(diff, k=len(diff))) for _ in range(2000))
        out["vs_ref"][n] = {
            "median_diff_ms": round(statistics.median(diff), 2),
            "ci95_ms": [round(boot[49], 2), round(boot[1949], 2)],
            "ref_faster_share": round(sum(d < 0 for d in diff) / len(diff), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
