"""Checks that a chart's values.schema.json refuses unknown keys everywhere: every object
schema with properties has `additionalProperties: false`; an object without properties must
be a map of strings (labels, annotations, nodeSelector) or say that it is passed through to
Kubernetes as it is (volumes, resources, affinity, tolerations: Kubernetes validates those).

Usage: python schema_strict.py values.schema.json...   Exit 1 naming each loose place.
"""
import json
import sys


def walk(node, path, errs):
    if not isinstance(node, dict):
        return
    if node.get("type") == "object" or "properties" in node:
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                errs.append(f"{path or '/'}: object with properties but without additionalProperties: false")
        else:
            ap = node.get("additionalProperties")
            string_map = isinstance(ap, dict) and ap.get("type") == "string"
            passed = "passed through" in node.get("description", "")
            if not (string_map or passed or "oneOf" in node):
                errs.append(f"{path or '/'}: object without properties that is neither a string map nor marked passed through")
        for k, v in (node.get("properties") or {}).items():
            walk(v, f"{path}/{k}", errs)
    if isinstance(node.get("items"), dict):
        walk(node["items"], f"{path}[]", errs)
    for i, alt in enumerate(node.get("oneOf") or []):
        walk(alt, f"{path}(oneOf {i})", errs)
    for k, v in (node.get("definitions") or {}).items():
        walk(v, f"#/definitions/{k}", errs)


def main(files):
    bad = False
    for f in files:
        errs = []
        walk(json.load(open(f)), "", errs)
        for e in errs:
            print(f"{f}: {e}", file=sys.stderr)
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
