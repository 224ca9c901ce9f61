"""Run the chunk pipeline once per (state config, output config) in a fresh process; report which crash."""
import itertools
import subprocess
import sys

CODE = r'''
import sys, torch, torch.nn.functional as F
import unifattn as ua
from unifattn.kernels import chunk, chunk_state
name, si, oi, dt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dtype = getattr(torch, dt)
orig = chunk._launch
def pinned(n, kernel, configs, grid, key, args, V):
    c = configs[si if n == "state" else oi]
    kernel[grid(c.kwargs["BV"])](**args, BV=c.kwargs["BV"], num_warps=c.num_warps, num_stages=c.num_stages)
chunk._launch = pinned
B, T, H, K, V = 8, 4096, 16, 128, 128
q = torch.randn(B, T, H, K, device="cuda", dtype=dtype); k = F.normalize(torch.randn_like(q).float(), dim=-1).to(dtype)
v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
e = {}
r = ua.rules.BUILTIN[name]
if name in ("gla", "kda"): e["g"] = F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 8
if name in ("simple_gla", "gated_deltanet"): e["g"] = F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 8
if name in ("deltanet", "gated_deltanet", "kda"): e["beta"] = torch.rand(B, T, H, device="cuda")
o, S = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
torch.cuda.synchronize()
o2, S2 = ua.ops.linear_attention(r, q[:1, :1024, :2].float(), k[:1, :1024, :2].float(), v[:1, :1024, :2].float(), form="recurrent", output_final_state=True, **{n: x[:1, :1024, :2] for n, x in e.items()})
oc, Sc = ua.ops.linear_attention(r, q[:1, :1024, :2], k[:1, :1024, :2], v[:1, :1024, :2], form="chunk", output_final_state=True, **{n: x[:1, :1024, :2] for n, x in e.items()})
print("ok err %.2e" % ((oc.float() - o2).abs().max() / o2.abs().max()).item())
'''

from unifattn.kernels.chunk_state import OUTPUT_CONFIGS, STATE_CONFIGS  # noqa: E402

for name in sys.argv[1:] or ["linear_attention"]:
    for dt in ("bfloat16",):
        for si, oi in itertools.product(range(len(STATE_CONFIGS)), range(len(OUTPUT_CONFIGS))):
            if si and oi:
                continue
            p = subprocess.run([sys.executable, "-c", CODE, name, str(si), str(oi), dt], capture_output=True, cwd="/tmp",
                               text=True, timeout=120)
            last = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
            print(f"{name:16s} state {si} {STATE_CONFIGS[si]}  output {oi} {OUTPUT_CONFIGS[oi]}: {last[0][:120]}")
