"""Probe launch configs of one chunk stage, each in its own process, so that one that faults the GPU
(an illegal memory access kills the CUDA context) cannot take the caller down. Before a config
joins a candidate list (kernels/chunk_intra.py, kernels/chunk_state.py), run it here on the H200.

    python benchmarks/diag_chunk_configs.py [--rules kda,linear_attention] [--stage state]
        [--config '{"BV": 64}' 8 2 ...]

For each rule and config: the forward at B=8 T=4096 H=16 K=V=128 bf16 with that config pinned on
the stage (every other stage at its first config) against the same call with the default configs,
and a B=1 T=1024 H=2 slice against the fp32 recurrent form. Prints 'ok' with both errors, or the
last line of the crash. Defaults probe the state pass at BV=64 and BV=128 on 8 warps (no spills on
sm_90 per benchmarks/ptxas_report.py; BV=64 on 4 warps faulted on the H200 for the gate-free class).
"""
import argparse
import json
import subprocess
import sys

CODE = r'''
import json, sys, torch, triton, torch.nn.functional as F
import unifattn as ua
from unifattn.kernels import chunk
name, stage, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
orig = chunk._launch
pin = {"on": False}
def pinned(n, kernel, configs, grid, key, args, V, writes, tune=False):
    if pin["on"] and n == stage:
        configs = [triton.Config(cfg[0], num_warps=cfg[1], num_stages=cfg[2])]
    else:
        configs = configs[:1]
    return orig(n, kernel, configs, grid, key, args, V, writes)
chunk._launch = pinned
def inputs(B, T, H, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, 128, device="cuda", generator=g).to(dtype)
    k = F.normalize(torch.randn(B, T, H, 128, device="cuda", generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, 128, device="cuda", generator=g).to(dtype)
    e = {}
    if name in ("gla", "kda"): e["g"] = F.logsigmoid(torch.randn(B, T, H, 128, device="cuda", generator=g)) / 8
    if name in ("simple_gla", "gated_deltanet"): e["g"] = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g)) / 8
    if name in ("deltanet", "gated_deltanet", "kda"): e["beta"] = torch.rand(B, T, H, device="cuda", generator=g)
    return q, k, v, e
r = ua.rules.BUILTIN[name]
q, k, v, e = inputs(8, 4096, 16, torch.bfloat16)
o0, S0 = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
pin["on"] = True
o1, S1 = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
torch.cuda.synchronize()
err_default = max(((o1.float() - o0.float()).abs().max() / o0.float().abs().max()).item(),
                  ((S1 - S0).abs().max() / S0.abs().max()).item())
q, k, v, e = inputs(1, 1024, 2, torch.float32)
o2, S2 = ua.ops.linear_attention(r, q, k, v, form="recurrent", output_final_state=True, **e)
o3, S3 = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
err_rec = max(((o3 - o2).abs().max() / o2.abs().max()).item(), ((S3 - S2).abs().max() / S2.abs().max()).item())
print("ok: vs default configs %.2e (bf16, full shape); fp32 slice vs recurrent %.2e" % (err_default, err_rec))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="linear_attention,gated_deltanet,kda")
    ap.add_argument("--stage", default="state", choices=["cumsum", "intra", "wu", "state", "output"])
    ap.add_argument("--config", nargs=3, action="append", metavar=("KWARGS", "WARPS", "STAGES"),
                    help="e.g. --config '{\"BV\": 64}' 8 1 (repeatable)")
    a = ap.parse_args()
    configs = [(json.loads(kw), int(w), int(s)) for kw, w, s in a.config] if a.config else \
        [({"BV": 64}, 8, 1), ({"BV": 64}, 8, 2), ({"BV": 128}, 8, 1)]
    for name in a.rules.split(","):
        for cfg in configs:
            try:
                p = subprocess.run([sys.executable, "-c", CODE, name, a.stage, json.dumps(cfg)], capture_output=True,
                                   cwd="/tmp", text=True, timeout=300)
                last = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["(no output)"]
            except subprocess.TimeoutExpired:
                last = ["timed out after 300 s"]
            print(f"{name:16s} {a.stage} {cfg}: {last[0][:160]}", flush=True)


if __name__ == "__main__":
    main()
