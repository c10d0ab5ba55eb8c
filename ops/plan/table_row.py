"""One markdown row of docs/capacity.md's tables from `moe plan --json` (read on stdin)."""
import json
import sys

v = json.load(sys.stdin)
p, i = v["plan"], v["inputs"]
gpus = "{} x 8 x {}".format(i["machines"], i["gpu"]["name"].upper())
layout = i["layout"]
if not v["fits"]:
    print("| {} | {} | no | | | | | | | | |".format(gpus, layout))
    sys.exit()
s, d, f = p["split"], p.get("decode"), p.get("prefill")
split = "all, both" if layout == "colocated" else "{} + {}".format(s["attention_gpus"], s["expert_gpus"])
slots = v["routed_experts_per_gpu"]
if d is None:
    print("| {} | {} | yes | {} | {} | misses the target | 0 | | | | |".format(gpus, layout, split, slots))
    sys.exit()
c = d["cost"]


def ms(x):
    return (x["memory"] + x["compute"]) * 1e3


step = "{:.1f} / {:.1f} / {:.1f} / {:.1f}".format(
    ms(c["attention"]), ms(c["dense"]), ms(c["experts"]), c["exchange"]["seconds"] * 1e3
)
print(
    "| {} | {} | yes | {} | {} | {} ({} mb, {}) | {:.0f} | {} | {} | {:.0f} | {} |".format(
        gpus, layout, split, slots, d["batch_per_attention_gpu"], c["micro_batches"],
        d["batch_limited_by"], d["tok_s_per_node"], d["bound"], step,
        f["input_tok_s_per_node"], f["bound"],
    )
)
