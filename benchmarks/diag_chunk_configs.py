"""Probe launch configs of one chunk stage, each in its own process, so that one that faults the GPU
(an illegal memory access kills the CUDA context) cannot take the caller down. Before a config
joins a candidate list (kernels/chunk_intra.py, kernels/chunk_state.py), run it here on the H200.

    python benchmarks/diag_chunk_configs.py [--rules kda,linear_attention] [--stage state]
        [--config '{"BV": 64}' 8 2 ... | --listed] [--jobs 8] [--time]

For each rule and config: the forward at B=8 T=4096 H=16 K=V=128 bf16 with that config pinned on
the stage (every other stage at its first config) against the same call with the default configs,
and a B=1 T=1024 H=2 slice against the fp32 recurrent form. Prints 'ok' with both errors, or the
last line of the crash. --jobs runs that many probes side by side (compiling is CPU work); --time
then times the stage's kernel (torch.profiler, mean of 20 forwards) and the whole forward under each
config that passed, one rule per process, configs in turn. Defaults probe the state pass at BV=64 and BV=128 on 8 warps (no spills on
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
    kw = dict(cfg[0])
    if n == "wu":
        pin["k"] = args["k"]
    if pin["on"] and kw.pop("NOKG", False):       # the per-channel delta path without the wu kernel's kg
        if n == "wu":
            args = dict(args, kg=None)
        if n == "state" and args.get("KG"):
            args = dict(args, KG=False, k=pin["k"])
    if pin["on"] and n == stage:
        configs = [triton.Config(kw, num_warps=cfg[1], num_stages=cfg[2])]
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
o0b, S0b = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
same = torch.equal(o0, o0b) and torch.equal(S0, S0b)
pin["on"] = True
o1, S1 = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
torch.cuda.synchronize()
rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
err_default = max(rel(o1, o0), rel(S1, S0))
# the full shape in fp32 through the recurrent form: what both bf16 chunk runs should approach
o2, S2 = ua.ops.linear_attention(r, q.float(), k.float(), v.float(), form="recurrent", output_final_state=True, **e)
err_full = max(rel(o1, o2), rel(S1, S2))
print("full shape bf16 vs fp32 recurrent %.2e (default config %.2e, %s from run to run)"
      % (err_full, max(rel(o0, o2), rel(S0, S2)), "same" if same else "DIFFERENT"))
q, k, v, e = inputs(1, 1024, 2, torch.float32)
o2, S2 = ua.ops.linear_attention(r, q, k, v, form="recurrent", output_final_state=True, **e)
o3, S3 = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
err_rec = max(((o3 - o2).abs().max() / o2.abs().max()).item(), ((S3 - S2).abs().max() / S2.abs().max()).item())
print("%s: vs default configs %.2e (bf16, full shape; default %s run to run) and %.2e vs fp32 recurrent; "
      "fp32 slice vs recurrent %.2e" % ("ok" if err_full < 3e-2 and err_rec < 1e-4 else "BAD", err_default,
                                        "same" if same else "DIFFERENT", err_full, err_rec))
'''

TIME = CODE[:CODE.index("r = ua.rules.BUILTIN[name]")] + r'''
r = ua.rules.BUILTIN[name]
q, k, v, e = inputs(8, 4096, 16, torch.bfloat16)
kname = {"cumsum": "chunk_cumsum", "intra": "chunk_intra", "wu": "chunk_wu", "state": "chunk_state",
         "output": "chunk_output"}[stage]
fwd = lambda: ua.ops.linear_attention(r, q, k, v, form="chunk", check_inputs=False, **e)
pin["on"] = True
for c in json.loads(sys.argv[4]):
    cfg[:] = c
    fwd()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fwd()
        torch.cuda.synchronize()
    ms = sum(ev.device_time_total for ev in prof.events()
             if ev.device_type == torch.autograd.DeviceType.CUDA and kname in ev.name) / 20 / 1e3
    print(f"time {name:16s} {stage} {json.dumps(c):40s} kernel {ms:.4f} ms  forward "
          f"{triton.testing.do_bench(fwd, warmup=25, rep=100):.4f} ms", flush=True)
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="linear_attention,gated_deltanet,kda")
    ap.add_argument("--stage", default="state", choices=["cumsum", "intra", "wu", "state", "output"])
    ap.add_argument("--config", nargs=3, action="append", metavar=("KWARGS", "WARPS", "STAGES"),
                    help="e.g. --config '{\"BV\": 64}' 8 1 (repeatable)")
    ap.add_argument("--listed", action="store_true", help="probe the stage's listed candidates (its *_CONFIGS)")
    ap.add_argument("--jobs", type=int, default=1, help="probes run side by side")
    ap.add_argument("--time", action="store_true", help="then time the stage under each config that passed")
    ap.add_argument("--time-rules", default=None, help="time only these rules (default: all probed)")
    a = ap.parse_args()
    configs = [(json.loads(kw), int(w), int(s)) for kw, w, s in a.config] if a.config else \
        [({"BV": 64}, 8, 1), ({"BV": 64}, 8, 2), ({"BV": 128}, 8, 1)]
    if a.listed:
        from unifattn.kernels import chunk_intra, chunk_state
        listed = {"cumsum": chunk_intra.CUMSUM_CONFIGS, "intra": chunk_intra.INTRA_CONFIGS,
                  "wu": chunk_intra.WU_CONFIGS, "state": chunk_state.STATE_CONFIGS,
                  "output": chunk_state.OUTPUT_CONFIGS}[a.stage]
        configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in listed]

    def probe(job):
        name, cfg = job
        try:
            p = subprocess.run([sys.executable, "-c", CODE, name, a.stage, json.dumps(cfg)], capture_output=True,
                               cwd="/tmp", text=True, timeout=300)
            last = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["(no output)"]
        except subprocess.TimeoutExpired:
            last = ["timed out after 300 s"]
        print(f"{name:16s} {a.stage} {cfg}: {last[0][:160]}", flush=True)
        return name, cfg, last[0].startswith("ok")

    from concurrent.futures import ThreadPoolExecutor
    jobs = [(name, cfg) for name in a.rules.split(",") for cfg in configs]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(probe, jobs))
    if a.time:
        for name in (a.time_rules or a.rules).split(","):
            good = [cfg for n, cfg, ok in results if n == name and ok]
            if good:
                p = subprocess.run([sys.executable, "-c", TIME, name, a.stage, json.dumps(good[0]), json.dumps(good)],
                                   capture_output=True, cwd="/tmp", text=True, timeout=600)
                print("\n".join(line for line in p.stdout.splitlines() if line.startswith("time"))
                      or (p.stdout + p.stderr)[-400:], flush=True)


if __name__ == "__main__":
    main()
