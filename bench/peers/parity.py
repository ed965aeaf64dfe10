"""Parity check, run by bench/run before any timing: POSTs every input to leuknet-server and
to every peer and compares `results[0].probability` (and the label) with the server's.

  parity.py --tol 1e-4 --out parity.json --ref leuknet=URL --peer fastapi=URL --peer bentoml=URL \
      [--variant fastapi-nodraft=URL] [--local CARD] KIND:CONTENT_TYPE:FILE [...]

--local CARD also runs the peers' pipeline in this process: as served (draft + fast_image_resize),
with Pillow's own resize, and with Pillow's plain path (no draft, Pillow resize); for information
only: reported, not enforced.
Exits 1, naming each offending input, when any peer differs from the server by more than --tol
(or --kind-tol KIND=TOL for that kind), from another peer by more than --tol, answers with
another label, or fails. Prints one JSON object (also written to --out):
{"tolerance", "ok", "per_kind": {KIND: {PEER: max |dp|}}, "inputs": [...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request


def post(url: str, path: str, ctype: str) -> dict:
    with open(path, "rb") as f:
        body = f.read()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["results"][0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--kind-tol", action="append", default=[],
                    help="KIND=TOL: another bound against the server for one input kind (the "
                         "peers must still agree with each other to --tol)")
    ap.add_argument("--out")
    ap.add_argument("--ref", required=True, help="NAME=URL of leuknet-server's classify route")
    ap.add_argument("--peer", action="append", default=[], help="NAME=URL (enforced)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=URL: a peer whose pipeline differs on purpose (e.g. no draft): "
                         "held to the server's bound and label, not to the other peers")
    ap.add_argument("--local", help="model card: also report Pillow in-process (not enforced)")
    ap.add_argument("inputs", nargs="+", help="KIND:CONTENT_TYPE:FILE")
    a = ap.parse_args()

    kind_tol = {k: float(v) for k, v in (x.split("=", 1) for x in a.kind_tol)}
    ref_name, ref_url = a.ref.split("=", 1)
    peers = [p.split("=", 1) + [True] for p in a.peer]
    peers += [v.split("=", 1) + [False] for v in a.variant]
    local = []
    if a.local:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        import numpy as np  # noqa: F401

        import leuknet_peer as lp

        model = lp.Model(a.local)

        def run_local(draft: bool, resizer: str):
            def f(path: str) -> dict:
                x, _ = lp.preprocess_bytes(open(path, "rb").read(), draft=draft, resizer=resizer)
                p = float(model.infer(x[None])[0])
                return {"probability": p, "label": "local"}
            return f

        local = [("local-draft-fir", run_local(True, "fir")),
                 ("local-draft-pillowresize", run_local(True, "pillow")),
                 ("local-full-pillowresize", run_local(False, "pillow"))]

    rows, failures = [], []
    per_kind: dict[str, dict[str, float]] = {}
    for spec in a.inputs:
        kind, ctype, path = spec.split(":", 2)
        ref = post(ref_url, path, ctype)
        row = {"kind": kind, "file": path, ref_name: ref["probability"], "label": ref["label"]}
        targets = [(n, (lambda u: lambda p: post(u, p, ctype))(u), True, cross)
                   for n, u, cross in peers]
        targets += [(n, f, False, False) for n, f in local]
        tol = kind_tol.get(kind, a.tol)
        seen: dict[str, float] = {}
        for name, call, enforced, cross in targets:
            try:
                res = call(path)
            except Exception as e:  # noqa: BLE001
                row[name] = None
                if enforced:
                    failures.append(f"{name} failed on {path}: {e}")
                continue
            d = abs(res["probability"] - ref["probability"])
            row[name] = res["probability"]
            k = per_kind.setdefault(kind, {})
            k[name] = max(k.get(name, 0.0), d)
            if enforced and d > tol:
                failures.append(f"{name} on {path}: p={res['probability']:.7f}, "
                                f"{ref_name} p={ref['probability']:.7f}, |dp|={d:.2e} > {tol}")
            if cross:
                for other, p in seen.items():
                    if abs(p - res["probability"]) > a.tol:
                        failures.append(f"{name} and {other} disagree on {path}: "
                                        f"{res['probability']:.7f} vs {p:.7f}")
                seen[name] = res["probability"]
            if enforced and res.get("label") != ref["label"]:
                failures.append(f"{name} on {path}: label {res.get('label')} != {ref['label']}")
        rows.append(row)

    result = {"tolerance": a.tol, "kind_tolerance": kind_tol, "ok": not failures,
              "reference": ref_name,
              "per_kind": per_kind, "inputs": rows, "failures": failures}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    for kind, d in per_kind.items():
        print(f"parity {kind}: " + ", ".join(f"{n} max |dp| {v:.2e}" for n, v in d.items()),
              file=sys.stderr)
    for msg in failures:
        print(f"PARITY FAILURE: {msg}", file=sys.stderr)
    print(json.dumps(result, separators=(",", ":")))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
