#!/usr/bin/env python3
"""Validates FHIR R4 Bundles written by leuknet-server (`Accept: application/fhir+json`).

Usage: validate.py BUNDLE.json...   (exit 0 when every file is valid)
       validate.py --self-test      (checks that the library accepts a good and refuses a bad one)

Each file is parsed with fhir.resources' R4B models (pydantic: types, cardinalities, unknown
elements, primitive formats), every entry is validated again as its own resource class, and
the checks the models leave out are done here: required code bindings that leuknet uses,
unique `urn:uuid:` full URLs, and references that must resolve inside the Bundle.
Installed by scripts/setup-test into .native/venv-test; run by tests/fhir.rs.
"""

import json
import re
import sys

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

UUID_URN = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
AIAST = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "AIAST")
# Required bindings (FHIR R4) of the coded elements leuknet fills in.
REQUIRED = {
    ("Bundle", "type"): {"document", "message", "transaction", "transaction-response", "batch",
                         "batch-response", "history", "searchset", "collection"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                "cancelled", "entered-in-error", "unknown"},
    ("Device", "status"): {"active", "inactive", "entered-in-error", "unknown"},
    ("Media", "status"): {"preparation", "in-progress", "not-done", "on-hold", "stopped",
                          "completed", "entered-in-error", "unknown"},
}
DEVICE_NAME_TYPES = {"udi-label-name", "user-friendly-name", "patient-reported-name",
                     "manufacturer-name", "model-name", "other"}


def references(node):
    """Every Reference.reference string anywhere under node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(node, list):
        for v in node:
            yield from references(v)


def check(text):
    """Returns a list of problems (empty when valid)."""
    problems = []
    try:
        Bundle.model_validate_json(text)
    except Exception as e:  # pydantic.ValidationError and friends
        return [f"fhir.resources R4B Bundle: {e}"]
    bundle = json.loads(text)
    if bundle.get("type") not in REQUIRED[("Bundle", "type")]:
        problems.append(f"Bundle.type {bundle.get('type')!r}")
    entries = bundle.get("entry", [])
    urls = {}
    for i, e in enumerate(entries):
        url, res = e.get("fullUrl"), e.get("resource", {})
        rtype = res.get("resourceType")
        where = f"entry[{i}] {rtype}"
        if not url or not UUID_URN.match(url):
            problems.append(f"{where}: fullUrl {url!r} is not a urn:uuid")
        if url in urls:
            problems.append(f"{where}: duplicate fullUrl {url}")
        urls[url] = rtype
        try:
            get_fhir_model_class(rtype).model_validate(res)
        except Exception as ex:
            problems.append(f"{where}: {ex}")
        for (t, field), allowed in REQUIRED.items():
            if t == rtype and field in res and res[field] not in allowed:
                problems.append(f"{where}: {field} {res[field]!r} not in the required value set")
        if rtype == "Device":
            for n in res.get("deviceName", []):
                if n.get("type") not in DEVICE_NAME_TYPES:
                    problems.append(f"{where}: deviceName.type {n.get('type')!r}")
    for i, e in enumerate(entries):
        res = e.get("resource", {})
        where = f"entry[{i}] {res.get('resourceType')}"
        for ref in references(res):
            if ref.startswith("urn:uuid:") and ref not in urls:
                problems.append(f"{where}: reference {ref} does not resolve in the Bundle")
        if res.get("resourceType") == "Observation":
            sec = [(c.get("system"), c.get("code")) for c in res.get("meta", {}).get("security", [])]
            if AIAST not in sec:
                problems.append(f"{where}: no AIAST security label")
            dev = res.get("device", {}).get("reference")
            if urls.get(dev) != "Device":
                problems.append(f"{where}: device {dev!r} is not a Device entry")
            for d in res.get("derivedFrom", []):
                if d.get("reference") and urls.get(d["reference"]) is None:
                    problems.append(f"{where}: derivedFrom {d['reference']} unresolved")
            codes = {json.dumps(c.get("code"), sort_keys=True) for c in res.get("component", [])}
            if json.dumps(res.get("code"), sort_keys=True) in codes:
                problems.append(f"{where}: a component repeats the Observation code (obs-7)")
    return problems


def self_test():
    good = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:0b6a2d5e-1b1e-4c1e-9c1e-1b1e4c1e9c1e",
             "resource": {"resourceType": "Device", "status": "active"}},
            {"fullUrl": "urn:uuid:1b6a2d5e-1b1e-4c1e-9c1e-1b1e4c1e9c1e",
             "resource": {"resourceType": "Observation", "status": "preliminary",
                          "meta": {"security": [{"system": AIAST[0], "code": AIAST[1]}]},
                          "code": {"text": "x"},
                          "device": {"reference": "urn:uuid:0b6a2d5e-1b1e-4c1e-9c1e-1b1e4c1e9c1e"},
                          "valueQuantity": {"value": 0.5, "unit": "1",
                                            "system": "http://unitsofmeasure.org", "code": "1"}}},
        ],
    }
    assert check(json.dumps(good)) == [], check(json.dumps(good))
    bad = json.loads(json.dumps(good))
    bad["entry"][1]["resource"]["valueQuantity"]["value"] = "high"
    assert check(json.dumps(bad)), "a string decimal must be refused"
    bad = json.loads(json.dumps(good))
    bad["entry"][1]["resource"]["bogus"] = 1
    assert check(json.dumps(bad)), "an unknown element must be refused"
    bad = json.loads(json.dumps(good))
    bad["entry"][1]["resource"]["status"] = "maybe"
    assert check(json.dumps(bad)), "a status outside the value set must be refused"
    print("validate.py: self-test ok")


def main(argv):
    if argv == ["--self-test"]:
        self_test()
        return 0
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = 0
    for path in argv:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        problems = check(text)
        if problems:
            failed += 1
            print(f"{path}: INVALID")
            for p in problems:
                print(f"  - {p}")
        else:
            n = len(json.loads(text).get("entry", []))
            print(f"{path}: valid FHIR R4 Bundle ({n} entries)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
