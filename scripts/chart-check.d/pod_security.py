"""Checks every Pod template in rendered Kubernetes YAML against the restricted Pod Security
Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/), plus a
read-only root filesystem, which this project asks of every container.

Usage: python pod_security.py FILE...   Exit 1 naming each object and rule that fails.
"""
import sys

import yaml

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def pod_spec(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec") or {}
    if kind in POD_KINDS:
        return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        return ((((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def check(spec):
    errs = []
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            errs.append(f"{flag} is set")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            errs.append(f"volume {v.get('name')}: type {sorted(kinds - ALLOWED_VOLUMES)} not allowed")
    if psc.get("runAsUser") == 0:
        errs.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    containers = [("container", c) for c in spec.get("containers") or []]
    containers += [("initContainer", c) for c in spec.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in spec.get("ephemeralContainers") or []]
    if not containers:
        errs.append("no containers")
    for what, c in containers:
        name = f"{what} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            errs.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            errs.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            errs.append(f"{name}: capabilities.add {caps.get('add')}")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            errs.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            errs.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in SECCOMP_OK:
            errs.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("readOnlyRootFilesystem") is not True:
            errs.append(f"{name}: readOnlyRootFilesystem is not true")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                errs.append(f"{name}: hostPort {p['hostPort']}")
    return errs


def main(files):
    failed, pods = False, 0
    for f in files:
        with open(f) as fh:
            for doc in yaml.safe_load_all(fh):
                if not isinstance(doc, dict):
                    continue
                spec = pod_spec(doc)
                if spec is None:
                    continue
                pods += 1
                obj = f"{f}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
                for e in check(spec):
                    print(f"restricted profile: {obj}: {e}", file=sys.stderr)
                    failed = True
    if pods == 0:
        print("restricted profile: no Pod templates found", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
