"""Offline structural check of ops/k8s manifests (no cluster, no network): every document has
apiVersion/kind/metadata.name; workloads' selectors match their pod labels; every Service and
NetworkPolicy selects a workload; StatefulSets name an existing headless Service; every MOE_*
variable is one the binary it configures accepts (from its --help); every file a MOE_*_FILE
variable names is in a mounted volume; and no expert node listens on all interfaces.

usage: check_k8s.py MANIFEST_DIR ROUTER_BIN NODE_BIN
"""
import glob
import os
import re
import subprocess
import sys

import yaml

KNOWN = {
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}


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
        if d["kind"] in ("Service", "NetworkPolicy"):
            services.append((where, d))
            continue
        spec = d["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        if d["kind"] != "Job" and not spec["selector"]["matchLabels"].items() <= labels.items():
            problems.append(f"{where}: selector does not match the pod labels")
        workloads.append((where, d, labels))
        pod = spec["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in volumes]
            for e in c.get("env", []):
                value = e.get("value", "")
                if e["name"].startswith("MOE_") and e["name"].endswith("_FILE"):
                    if not any(value.startswith(m.rstrip("/") + "/") for m in mounts):
                        problems.append(f"{where}: {e['name']}={value} is not in a mounted volume")
                if e["name"] == "MOE_LISTEN" and value.startswith(("0.0.0.0", "[::]")):
                    problems.append(f"{where}: the data plane listens on all interfaces")
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
        selector = s["spec"].get("selector") or s["spec"].get("podSelector", {}).get("matchLabels", {})
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
