"""Offline structural check of ops/k8s manifests (no cluster, no network): every document has
apiVersion/kind/metadata.name; workloads' selectors match their pod labels; every Service selects
a workload and names ports that exist; StatefulSets name an existing headless Service; and every
MOE_* variable is one the binary it configures accepts (from its --help).

usage: check_k8s.py MANIFEST_DIR ROUTER_BIN NODE_BIN
"""
import glob
import os
import re
import subprocess
import sys

import yaml

KNOWN = {("v1", "Service"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet")}


def accepted_env(binary):
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"env: (MOE_[A-Z_]+)=", text))


def main():
    directory, router_bin, node_bin = sys.argv[1:4]
    accepted = {"moe-router": accepted_env(router_bin), "moe-expert-node": accepted_env(node_bin)}
    docs = []
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    problems = []
    workloads, services = [], []
    for path, d in docs:
        where = f"{os.path.basename(path)}:{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if (d.get("apiVersion"), d.get("kind")) not in KNOWN:
            problems.append(f"{where}: unexpected apiVersion/kind")
            continue
        if not d.get("metadata", {}).get("name"):
            problems.append(f"{where}: no metadata.name")
        if d["kind"] == "Service":
            services.append((where, d))
            continue
        spec = d["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        if not spec["selector"]["matchLabels"].items() <= labels.items():
            problems.append(f"{where}: selector does not match the pod labels")
        workloads.append((where, d, labels))
        for c in spec["template"]["spec"]["containers"]:
            if not c.get("image") or not c.get("name"):
                problems.append(f"{where}: container without name or image")
            binary = (c.get("command") or [""])[0]
            names = {e["name"] for e in c.get("env", [])}
            for name in sorted(n for n in names if n.startswith("MOE_")):
                if binary in accepted and name not in accepted[binary]:
                    problems.append(f"{where}: {binary} does not accept {name}")
            ports = {p["name"] for p in c.get("ports", [])}
            probe = c.get("readinessProbe", {}).get("httpGet", {}).get("port")
            if isinstance(probe, str) and probe not in ports:
                problems.append(f"{where}: probe port {probe} is not a container port")
    for where, s in services:
        selector = s["spec"].get("selector", {})
        if not any(selector.items() <= labels.items() for _, _, labels in workloads):
            problems.append(f"{where}: selects no workload")
    service_names = {s["metadata"]["name"] for _, s in services}
    for where, d, _ in workloads:
        if d["kind"] == "StatefulSet" and d["spec"].get("serviceName") not in service_names:
            problems.append(f"{where}: serviceName is not a Service here")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"{len(docs)} documents OK")


if __name__ == "__main__":
    main()
