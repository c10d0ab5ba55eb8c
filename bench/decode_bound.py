#!/usr/bin/env python3
"""The memory-bandwidth bound of a decode step: the bytes one step of B sequences must read
(every dense weight, the routed experts its tokens pick, each sequence's KV cache) over the
machine's bandwidth. Routing is taken as uniform (a synthetic checkpoint's gate spreads tokens
about evenly): B tokens picking top-k of E experts touch E * (1 - (1 - k/E)^B) of them.

    bench/decode_bound.py MODEL_DIR --batches 1,8,64,256 --context 192 --bandwidth-gbs 4800 \
        --projection-bytes 1 --other-bytes 4 --kv-bytes 4

MODEL_DIR's config.json gives the shapes. --projection-bytes: bytes per weight of the
projections (1 for FP8 kept as FP8, 2 for bf16, 4 for f32); --other-bytes: the embeddings,
lm_head and MoE gate as held (bf16 widened to f32 on a GPU in --gpu-dtype f32: 4).
Prints one line per batch: GB read per step, the bound's step time and tok/s.
"""
import argparse
import json
import os


def shapes(config):
    h = config["hidden_size"]
    layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts") or config.get("num_experts") or config.get("num_local_experts")
    top_k = config["num_experts_per_tok"]
    moe_inter = config.get("moe_intermediate_size", config["intermediate_size"])
    shared = config.get("n_shared_experts") or 0
    if config.get("model_type") == "deepseek_v3":
        heads = config["num_attention_heads"]
        nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
        lora, q_lora = config["kv_lora_rank"], config.get("q_lora_rank")
        q = h * q_lora + q_lora * heads * (nope + rope) if q_lora else h * heads * (nope + rope)
        attention = q + h * (lora + rope) + lora * heads * (nope + v) + heads * v * h
        kv_per_token = lora + rope
        first_dense = config.get("first_k_dense_replace", 0)
    else:
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim", h // heads)
        attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
        kv_per_token = 2 * kv_heads * head_dim
        first_dense = 0
    moe_layers = layers - first_dense
    return {
        "attention": layers * attention,
        "dense_mlp": first_dense * 3 * h * config["intermediate_size"],
        "shared": moe_layers * 3 * h * moe_inter * shared,
        "expert": 3 * h * moe_inter,
        "experts": experts,
        "top_k": top_k,
        "moe_layers": moe_layers,
        "gate": moe_layers * experts * h,
        "lm_head": config["vocab_size"] * h,
        "kv_per_token": layers * kv_per_token,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--context", type=int, required=True, help="mean tokens in each sequence's cache")
    p.add_argument("--bandwidth-gbs", type=float, required=True)
    p.add_argument("--projection-bytes", type=float, default=1.0)
    p.add_argument("--other-bytes", type=float, default=2.0)
    p.add_argument("--kv-bytes", type=float, default=4.0)
    args = p.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        s = shapes(json.load(f))
    projections = s["attention"] + s["dense_mlp"] + s["shared"]
    fixed = projections * args.projection_bytes + (s["gate"] + s["lm_head"]) * args.other_bytes
    print(f"decode bound at {args.bandwidth_gbs:.0f} GB/s: {s['moe_layers']} MoE layers of "
          f"{s['experts']} experts (top-{s['top_k']}), {fixed / 1e9:.2f} GB of dense weights per step")
    for batch in (int(b) for b in args.batches.split(",")):
        touched = s["experts"] * (1 - (1 - s["top_k"] / s["experts"]) ** batch)
        experts = s["moe_layers"] * touched * s["expert"] * args.projection_bytes
        kv = batch * args.context * s["kv_per_token"] * args.kv_bytes
        total = fixed + experts + kv
        ms = total / (args.bandwidth_gbs * 1e9) * 1e3
        print(f"  batch {batch:>4}: {touched:6.1f} experts per layer, {total / 1e9:7.2f} GB per step "
              f"({experts / 1e9:.2f} experts, {kv / 1e9:.2f} KV): {ms:7.3f} ms, {batch / ms * 1e3:9.1f} tok/s")


if __name__ == "__main__":
    main()
