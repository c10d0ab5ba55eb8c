#!/usr/bin/env python3
"""A client nobody on this team wrote the transport for: Python grpcio, with stubs compiled from
the repository's .proto files, and the standard grpc.health.v1 client.

Usage:
  grpc_client.py health ADDR            prints SERVING / NOT_SERVING (overall and moe.v1.Inference)
  grpc_client.py generate ADDR JSON     JSON = {"input_ids": [...], "max_new_tokens": N} or
                                        {"prompt": "...", ...}; prints the result as one JSON line
"""
import json
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="moe-stubs-")
    protos = [os.path.join("moe", "v1", f) for f in ("inference.proto", "admin.proto")]
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{os.path.dirname(protoc.__file__)}/_proto",
            f"--python_out={out}", f"--grpc_python_out={out}"] + protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    from moe.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
    return inference_pb2, inference_pb2_grpc


def health(addr):
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        names = health_pb2.HealthCheckResponse.ServingStatus.Name
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        service = stub.Check(health_pb2.HealthCheckRequest(service="moe.v1.Inference"), timeout=5).status
        print(json.dumps({"overall": names(overall), "inference": names(service)}))


def generate(addr, spec):
    pb, pb_grpc = load_stubs()
    request = pb.GenerateRequest(
        max_new_tokens=spec["max_new_tokens"], temperature=0.0, ignore_eos=True, logprobs=True)
    if "prompt" in spec:
        request.prompt = spec["prompt"]
    else:
        request.input_ids.extend(spec["input_ids"])
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        ids, logprobs, pieces, finish, usage = [], [], [], None, None
        for msg in stub.Generate(request, timeout=60):
            ids.extend(msg.token_ids)
            logprobs.extend(msg.logprobs)
            pieces.append(msg.text)
            if msg.finish_reason:
                finish = msg.finish_reason
                usage = [msg.usage.prompt_tokens, msg.usage.completion_tokens]
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    print(json.dumps({"output_ids": ids, "logprobs": logprobs, "text": "".join(pieces),
                      "finish_reason": finish, "usage": usage, "model_type": info.model_type}))


if __name__ == "__main__":
    if sys.argv[1] == "health":
        health(sys.argv[2])
    elif sys.argv[1] == "generate":
        generate(sys.argv[2], json.loads(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
