"""Offline check of ops/compose/docker-compose.yml (no Docker): every MOE_* variable of the
router and node services is one their binary accepts (from its --help); every MOE_*_FILE names
a secret `moe gen-secrets` writes, in a volume the service mounts; routers and nodes carry the
cluster token and etcd credentials; only the router's public ports are published.

usage: check_compose.py COMPOSE_FILE ROUTER_BIN NODE_BIN SECRET_NAMES(comma-separated)
"""
import os
import re
import subprocess
import sys

import yaml


def accepted_env(binary):
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"env: (MOE_[A-Z_]+)=", text))


def main():
    path, router_bin, node_bin, secret_names = sys.argv[1:5]
    secrets = set(secret_names.split(","))
    accepted = {"moe-router": accepted_env(router_bin), "moe-expert-node": accepted_env(node_bin)}
    with open(path) as f:
        compose = yaml.safe_load(f)
    problems = []
    members = 0
    for name, service in compose["services"].items():
        entry = service.get("entrypoint") or ["moe-router" if service.get("image") == "moe-cluster" else ""]
        binary = entry[0]
        if binary not in accepted:
            continue
        members += 1
        env = service.get("environment", {})
        mounts = [v.split(":")[1] for v in service.get("volumes", [])]
        for key, value in env.items():
            if not key.startswith("MOE_"):
                continue
            if key not in accepted[binary]:
                problems.append(f"{name}: {binary} does not accept {key}")
            if key.endswith("_FILE"):
                if os.path.basename(value) not in secrets:
                    problems.append(f"{name}: {key}={value} is not a secret moe gen-secrets writes")
                if not any(value.startswith(m.rstrip("/") + "/") for m in mounts):
                    problems.append(f"{name}: {key}={value} is not in a mounted volume")
        for needed in ["MOE_CLUSTER_TOKEN_FILE", "MOE_ETCD_USER", "MOE_ETCD_PASSWORD_FILE"]:
            if needed not in env:
                problems.append(f"{name}: no {needed}")
        published = [str(p).split(":")[-1] for p in service.get("ports", [])]
        if binary == "moe-expert-node" and published:
            problems.append(f"{name}: an expert node publishes ports {published}")
        if binary == "moe-router" and not set(published) <= {"50051", "8000"}:
            problems.append(f"{name}: the router publishes more than its public ports: {published}")
    if members == 0:
        problems.append("no router or node service found")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"{members} cluster services OK")


if __name__ == "__main__":
    main()
