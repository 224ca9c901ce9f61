"""Generated chunk kernels vs flash-linear-attention and SDPA on one GPU, one run.

    python benchmarks/bench_linear.py [--quick] [--no-decode] [--rules dplr --fla dplr]

`--rules dplr` adds the DPLR chunk form (kernels/chunk_dplr.py; RWKV-7-like inputs) beside fla's
chunk_dplr_delta_rule (not in the default list: fla's first call autotunes for minutes). H200,
2026-11-29 (session 11), core ms at the shape below:
    chunk 16, element-wise intra (call 1)        ours 3.682   fla 3.564 in the same run
    chunk 64, sub-blocks only (call 2)           ours 4.509   fla 3.585 in the same run
    chunk 64, whole-chunk products (calls 3, 4)  ours 2.654, 2.641; fla's first call ran past the
                                                 part's time limit in both runs (no fla row)
    the same, session 12 (calls 1, 2)            ours 2.726, 2.723   fla 3.566, 3.571 in the same runs
  per kernel (profile_linear.py, call 3): intra 1.293, wu 0.531, state 0.408, output 0.280, cumsum
  0.135; fla (call 2): intra 1.556, h 1.026, o 0.376, cumsum 0.207, elementwise 0.183, wu 0.151,
  wy 0.074. bf16 chunk vs fp32 recurrent 7.6e-3 (max error / max |ref|).

1. correctness at the benchmark shape: chunk form vs our recurrent form (fp32
   inputs, full shape) and vs the float32 reference on a slice;
2. first call (codegen + compile of the default configs) with an empty cache; tuning is a
   separate, explicit call (tune=True) before timing;
3. forward timings (triton.testing.do_bench medians) of ours, fla (when it
   imports) and SDPA causal, with ratios, achieved TB/s and TFLOP/s;
4. the decode step (T = 1, state updated in place) at B = 16.

Measured 2026-11-29 on an H200 (torch 2.11, Triton 3.6, fla-core 0.6.0), B=8 T=4096 H=16
K=V=128 bf16, all seven rules and the decode step in one run (session 13, call 2; the kernels as
landed, tuned.json timed afresh):

    rule               op ms   unchecked   core ms   fla ms   fla/core   first call
    linear_attention   0.701     0.362      0.363     0.373     1.03        4.5 s
    simple_gla         0.797     0.394      0.394     0.414     1.05        5.6 s
    gla                1.295     0.793      0.793     1.360     1.72        8.2 s
    deltanet           1.310     0.802      0.801     1.007     1.26        7.7 s
    gated_deltanet     1.275     0.825      0.824     0.844     1.02       11.0 s
    kda                2.103     1.632      1.633     1.806     1.11       12.1 s
    dplr               3.470     2.720      2.721     3.574     1.31       15.3 s
    SDPA causal fwd    0.984
    decode B=16, fp32 state in place, CUDA-graph replay: gated_deltanet kernel 8.5 us = 3.95 TB/s,
    kda 8.7 us = 3.84 TB/s; fla fused_recurrent 12.0 / 10.6 us (2.80 / 3.16 TB/s). From a launch
    loop: kernel 16.3 / 16.5 us, op 60.4 / 36.2 us unchecked (host-bound), fla 41.5 / 45.3 us.
Session 12 (call 2, the kernels before the log-gate clamp moved to -104) gave the same within 1%:
core 0.365 / 0.397 / 0.793 / 0.803 / 0.824 / 1.635 / 2.723 ms against fla 0.372 / 0.412 / 1.361 /
1.008 / 0.841 / 1.814 / 3.571.
Tuned configs (session 13, calls 1 and 2): gla and kda intra "whole" (two whole-chunk
tensor-core products, BK=32 on 4 warps), deltanet / gated_deltanet intra "fused" on 1 warp; state
pass KSPLIT everywhere. Checks in the same run: chunk vs fp32 reference 3.5e-7 to 6.8e-7, chunk vs
recurrent (fp32, full shape) 5.7e-7 to 8.8e-7 (session 13: 6.3e-7 to 8.8e-7), bf16 chunk vs fp32 recurrent 4.6e-3 to 8.3e-3
(max error / max |ref|), the tuned configs likewise. Before the whole-chunk intra pass (session 9):
gla 1.071, kda 1.967 ms (fla 1.361, 1.806); kda's intra alone was 1.06-1.19 ms against fla's
token-parallel + inter-solve 0.401 + 0.392.
"""
from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import torch
import torch.nn.functional as F
import triton

import unifattn as ua
from unifattn import codegen
from unifattn.kernels import chunk as chunk_module

COPY_TBS, MATMUL_TFLOPS = 4.22, 708.0        # ceilings measured on the H200 (BENCHMARKS.md)
RULES = ["linear_attention", "simple_gla", "gla", "deltanet", "gated_deltanet", "kda"]


def inputs(name, B, T, H, K, V, dtype, device, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    extra = {}
    if "delta" in name or name == "kda":
        k = F.normalize(k.float(), dim=-1).to(dtype)
        extra["beta"] = torch.sigmoid(torch.randn(B, T, H, device=device))
    if name in ("simple_gla", "gated_deltanet"):
        extra["g"] = F.logsigmoid(torch.randn(B, T, H, device=device)) / 8
    if name in ("gla", "kda", "dplr"):
        extra["g"] = F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 8
    if name == "dplr":    # RWKV-7's removal: b a unit vector, a = -c b with c in (0, 1)
        extra["b"] = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
        extra["a"] = -torch.rand(B, T, H, 1, device=device) * extra["b"]
        k = (0.3 * k.float()).to(dtype)
    return q, k, v, extra


def fla_fn(name):
    try:
        if name == "linear_attention":
            from fla.ops.linear_attn import chunk_linear_attn
            return lambda q, k, v, e: chunk_linear_attn(q, k, v, normalize=False)
        if name == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla
            return lambda q, k, v, e: chunk_simple_gla(q, k, v, g=e["g"])
        if name == "gla":
            from fla.ops.gla import chunk_gla
            return lambda q, k, v, e: chunk_gla(q, k, v, g=e["g"])
        if name == "deltanet":
            from fla.ops.delta_rule import chunk_delta_rule
            return lambda q, k, v, e: chunk_delta_rule(q, k, v, beta=e["beta"])
        if name == "gated_deltanet":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            return lambda q, k, v, e: chunk_gated_delta_rule(q, k, v, g=e["g"], beta=e["beta"])
        if name == "kda":
            from fla.ops.kda import chunk_kda
            return lambda q, k, v, e: chunk_kda(q, k, v, g=e["g"], beta=e["beta"])
        if name == "dplr":
            # fla's a reads the state and its b writes: S' = Diag(exp gk) S + b (a^T S) + k v^T
            from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule
            return lambda q, k, v, e: chunk_dplr_delta_rule(q, k, v, a=e["b"].to(q.dtype), b=e["a"].to(q.dtype),
                                                            gk=e["g"])
    except Exception as exc:  # noqa: BLE001 - fla is optional
        return f"{type(exc).__name__}: {exc}"[:80]
    return None


def fla_decode(name):
    """fla's fused_recurrent step for gated_deltanet / kda: f(q, k, v, extra, state) updates state in place
    (fla returns the final state: copied back, as a serving loop keeps it); a message if fla is missing."""
    try:
        if name == "kda":
            from fla.ops.kda import fused_recurrent_kda as f_rec
        else:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as f_rec
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:60]}"

    def step(q, k, v, e, S):
        return f_rec(q, k, v, g=e["g"], beta=e["beta"], initial_state=S, output_final_state=True)
    return step


FIRST_CALL = """
import sys, time, torch
sys.path.insert(0, {here!r})
from bench_linear import inputs
t0 = time.perf_counter()
import unifattn as ua
q, k, v, e = inputs({name!r}, 1, 256, 2, {K}, {V}, torch.bfloat16, "cuda")
t1 = time.perf_counter()
ua.ops.linear_attention(ua.rules.BUILTIN[{name!r}], q, k, v, form="chunk", **e)
torch.cuda.synchronize()
print(time.perf_counter() - t1)
"""


def first_call(name, K, V):
    """Seconds of a first chunk call (codegen + Triton compile of the default configs) in a new process
    whose unifattn and Triton caches are empty; inputs are made before the clock starts."""
    import subprocess
    import sys
    env = dict(os.environ, UNIFATTN_CACHE_DIR=tempfile.mkdtemp(), TRITON_CACHE_DIR=tempfile.mkdtemp())
    code = FIRST_CALL.format(here=os.path.dirname(os.path.abspath(__file__)), name=name, K=K, V=V)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(), capture_output=True,
                         text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  first call of {name} failed: {out.stderr[-400:]}", flush=True)
        return float("nan")


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def flops(name, B, T, H, K, V, C=64):
    """Matmul flops of the chunk algorithm (intra QK^T and AV, state in/out; delta: KK^T, solve, W/U)."""
    f = 2 * B * T * H * (C * K + C * V + 2 * K * V)
    if "delta" in name or name == "kda":
        f += 2 * B * T * H * (C * K + C * C + C * (K + V) + K * V)
    if name == "dplr":    # chunks of 16: four gated C x C matrices, the solve, W, U, and two more state terms
        C = 16
        f = 2 * B * T * H * (4 * C * K + C * C + C * (K + V) + 3 * C * V + 4 * K * V)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode step (and its fla side)")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--fla", default=",".join(RULES),
                    help="rules to time fla on (its first call autotunes for minutes: kda took 215 s)")
    a = ap.parse_args()
    fla_rules = set(a.fla.split(",")) if a.fla else set()
    dev = "cuda"
    B, T, H, K, V = (2, 1024, 8, 128, 128) if a.quick else (8, 4096, 16, 128, 128)
    dtype = torch.bfloat16
    rows, checks = [], []
    # a carried cache (benchmarks/h200.sh) keeps the tuner's choices (tuned.json) between calls;
    # the first-call timing always runs with empty caches of its own
    os.environ.setdefault("UNIFATTN_CACHE_DIR", tempfile.mkdtemp())

    print(f"shape B={B} T={T} H={H} K={K} V={V}, bf16; ceilings {COPY_TBS} TB/s copy, {MATMUL_TFLOPS} TFLOP/s")
    print("rule: err vs fp32 reference (slice) | chunk vs recurrent fp32 (full) | bf16 chunk vs fp32 recurrent; "
          "first call s; op ms (with input checks) / core ms / fla ms; TB/s; TFLOP/s", flush=True)
    for name in a.rules.split(","):
        r = ua.rules.BUILTIN[name]
        # first call: codegen + compile from empty caches, in a fresh process (h200.sh may carry a
        # warm Triton cache for this one), then this process's own first call
        first = first_call(name, K, V)
        q, k, v, e = inputs(name, 1, 256, 2, K, V, dtype, dev)
        ua.ops.linear_attention(r, q, k, v, form="chunk", **e)

        # correctness: slice vs the float32 reference, full shape (fp32) chunk vs recurrent
        q, k, v, e = inputs(name, 1, 512, 2, K, V, torch.float32, dev, seed=1)
        o_ref, S_ref = ua.ops.linear_attention(r, q, k, v, form="reference", output_final_state=True, **e)
        o_c, S_c = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
        err_ref = max(((o_c - o_ref).abs().max() / o_ref.abs().max()).item(),
                      ((S_c - S_ref).abs().max() / S_ref.abs().max()).item())
        q, k, v, e = inputs(name, B, T, H, K, V, torch.float32, dev, seed=2)
        o_c, S_c = ua.ops.linear_attention(r, q, k, v, form="chunk", output_final_state=True, **e)
        o_r, S_r = ua.ops.linear_attention(r, q, k, v, form="recurrent", output_final_state=True, **e)
        err_full = max(((o_c - o_r).abs().max() / o_r.abs().max()).item(),
                       ((S_c - S_r).abs().max() / S_r.abs().max()).item())
        bf_q, bf_k, bf_v, bf_e = inputs(name, B, T, H, K, V, dtype, dev, seed=2)
        o_b, _ = ua.ops.linear_attention(r, bf_q, bf_k, bf_v, form="chunk", **bf_e)
        err_bf = ((o_b.float() - o_r).abs().max() / o_r.abs().max()).item()
        # tune the bf16 launch configs once (the timed ones), then check the tuned kernels too
        before = dict(chunk_module._TUNED)
        t0 = time.perf_counter()
        ua.ops.linear_attention(r, bf_q, bf_k, bf_v, form="chunk", tune=True, **bf_e)
        t_tune = time.perf_counter() - t0
        o_b, _ = ua.ops.linear_attention(r, bf_q, bf_k, bf_v, form="chunk", **bf_e)
        err_tuned = ((o_b.float() - o_r).abs().max() / o_r.abs().max()).item()
        chosen = {key[0]: cfg for key, cfg in chunk_module._TUNED.items() if cfg is not None and before.get(key) is None}
        print(f"  {name}: tuned in {t_tune:.1f} s; " + ", ".join(f"{st} {cfg}" for st, cfg in chosen.items()),
              flush=True)
        checks.append((name, err_ref, err_full, err_bf, err_tuned, first))
        del q, k, v, e, o_c, o_r, S_c, S_r, o_b

        # timing, bf16
        q, k, v, e = bf_q, bf_k, bf_v, bf_e
        mod = codegen.module(r, "chunk")
        x = {"q": q, "k": k, "v": v, **e}
        heads = {s.name: x[s.name].shape[2] for s in r.inputs if s.kind == "token"}
        t_op = bench(lambda: ua.ops.linear_attention(r, q, k, v, form="chunk", **e))
        t_unchk = bench(lambda: ua.ops.linear_attention(r, q, k, v, form="chunk", check_inputs=False, **e))
        t_core = bench(lambda: mod.forward(x, heads, B, T, H, H, K, V, K ** -0.5, None, False, None))
        t_fla = "timed after ours" if name in fla_rules else "not timed in this run"
        nbytes = (3 * B * T * H * K + B * T * H * V) * 2 + sum(t.numel() * 4 for t in e.values())
        rows.append((name, t_op, t_unchk, t_core, t_fla, nbytes / t_core / 1e9,
                     flops(name, B, T, H, K, V) / t_core / 1e9))
        fs = f"{t_fla:.3f}" if isinstance(t_fla, float) else str(t_fla)
        print(f"  {name:16s} {err_ref:.1e} {err_full:.1e} {err_bf:.1e}  first {first:5.1f} s  "
              f"op {t_op:.3f} unchecked {t_unchk:.3f} core {t_core:.3f} fla {fs}  {rows[-1][5]:.2f} TB/s "
              f"{rows[-1][6]:.0f} TFLOP/s",
              flush=True)
        del q, k, v, e, x
        torch.cuda.empty_cache()

    print_decode = None if a.no_decode else _decode(H, K, V, dtype, dev)
    qs = torch.randn(B, H, T, K, device=dev, dtype=dtype)
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, qs, qs, is_causal=True))
    print(f"  SDPA causal fwd {t_sdpa:.3f} ms", flush=True)
    del qs

    # fla last: its first calls compile and autotune for minutes (kda alone took 215 s on a cold
    # machine). On SIGTERM (the time limit of h200.sh) the table below is still printed.
    def stop(*_):
        raise TimeoutError("SIGTERM")
    signal.signal(signal.SIGTERM, stop)
    try:
        for i, (name, t_op, t_unchk, t_core, _, tbs, tfl) in enumerate(rows):
            if name not in fla_rules:
                continue
            rows[i] = (name, t_op, t_unchk, t_core, "stopped by the time limit", tbs, tfl)
            q, k, v, e = inputs(name, B, T, H, K, V, dtype, dev, seed=2)
            f = fla_fn(name)
            try:
                t_fla = bench(lambda: f(q, k, v, e)) if callable(f) else f
            except TimeoutError:
                raise
            except Exception as exc:  # noqa: BLE001
                t_fla = f"{type(exc).__name__}: {str(exc)[:60]}"
            rows[i] = (name, t_op, t_unchk, t_core, t_fla, tbs, tfl)
            print(f"  fla {name:16s} {t_fla if isinstance(t_fla, str) else f'{t_fla:.3f} ms'}", flush=True)
            del q, k, v, e
            torch.cuda.empty_cache()
    except TimeoutError:
        print("  (time limit reached while timing fla: its remaining rows are missing)", flush=True)

    print(f"\nshape B={B} T={T} H={H} K={K} V={V}, bf16; ceilings {COPY_TBS} TB/s copy, {MATMUL_TFLOPS} TFLOP/s bf16")
    print("\ncorrectness (max error relative to max |ref|): chunk vs fp32 reference on B=1 T=512 H=2, "
          "chunk vs recurrent at full shape (fp32), bf16 chunk vs fp32 recurrent (default configs, then tuned); "
          "first call s")
    for name, e1, e2, e3, e4, first in checks:
        print(f"  {name:18s} {e1:9.2e} {e2:9.2e} {e3:9.2e} {e4:9.2e}   first call {first:6.2f} s")
    print("\nop = ua.ops.linear_attention (validation + input scan + kernels); unchecked = check_inputs=False;"
          "\ncore = the generated module's forward alone; fla = fla-core's chunk op; fla/x = fla ms / x ms")
    print(f"\n{'rule':18s} {'op ms':>8s} {'unchk ms':>8s} {'core ms':>8s} {'fla ms':>8s} {'fla/op':>7s} "
          f"{'fla/unchk':>9s} {'fla/core':>8s} {'TB/s':>6s} {'TFLOP/s':>8s}")
    for name, t_op, t_unchk, t_core, t_fla, tbs, tfl in rows:
        fla_s = f"{t_fla:8.3f}" if isinstance(t_fla, float) else "   n/a  "
        ratio = (f"{t_fla / t_op:7.2f} {t_fla / t_unchk:9.2f} {t_fla / t_core:8.2f}" if isinstance(t_fla, float)
                 else " " * 26)
        print(f"{name:18s} {t_op:8.3f} {t_unchk:8.3f} {t_core:8.3f} {fla_s} {ratio} {tbs:6.2f} {tfl:8.1f}")
        if not isinstance(t_fla, float) and t_fla:
            print(f"{'':18s}   fla: {t_fla}")
    print(f"{'SDPA causal':18s} {t_sdpa:8.3f}")
    if print_decode is None:
        return
    dec, Bd, gb = print_decode
    print(f"\ndecode step B={Bd} H={H} K=V={K} (state fp32 read + written: {gb * 1e3:.1f} MB; graph = CUDA-graph "
          "replay, the GPU time of a step; loop = launch loop, bound by the host's launch cost at this size)")
    for row in dec:
        print(f"  {row['name']:16s} {_decode_line(row, gb)}")


def graph_bench(fn):
    """ms per call replayed from a CUDA graph: the GPU time of a step as a serving loop runs it (captured
    once), free of the host's launch cost, which a launch loop measures instead when a kernel is this
    short; None if fn cannot be captured."""
    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100)
    except Exception as exc:  # noqa: BLE001
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:100]})", flush=True)
        return None


def _decode(H, K, V, dtype, dev):
    """One token, B=16, state updated in place: ours (the op, checked and not, and its kernel launch alone)
    and fla's fused_recurrent, each from a launch loop and from CUDA-graph replay."""
    Bd = 16
    dec = []
    for name in ("gated_deltanet", "kda"):
        r = ua.rules.BUILTIN[name]
        q, k, v, e = inputs(name, Bd, 1, H, K, V, dtype, dev)
        S = torch.zeros(Bd, H, K, V, device=dev)

        def op(check):
            return lambda: ua.ops.linear_attention(r, q, k, v, initial_state=S, form="recurrent", inplace_state=True,
                                                   check_inputs=check, **e)
        mod = codegen.module(r, "recurrent")
        x = {"q": q, "k": k, "v": v, **e}
        heads = {n: x[n].shape[2] for n in ("q", "k", "v", *e) if x[n].dim() >= 3}
        o = torch.empty_like(v)
        kernel = lambda: mod.launch(x, heads, o, S, S, None, K ** -0.5, Bd, 1, H, K, V, 16, 2)  # noqa: E731 - the op's
        f = fla_decode(name)
        if callable(f):
            S_f = S.clone()
            fla = lambda: f(q, k, v, e, S_f)  # noqa: E731
            t_f = (bench(fla), graph_bench(fla))
        else:
            t_f = f
        row = dict(name=name, op=bench(op(True)), unchecked=bench(op(False)), unchecked_graph=graph_bench(op(False)),
                   kernel=bench(kernel), kernel_graph=graph_bench(kernel), fla=t_f)
        dec.append(row)
        print(f"  decode {name:16s} B={Bd} {_decode_line(row, S.numel() * 8 / 1e9)}", flush=True)
    return dec, Bd, 2 * Bd * H * K * V * 4 / 1e9


def _decode_line(row, gb):
    g = lambda t: "n/a" if t is None else f"{t * 1e3:.1f} us = {gb / t:.2f} TB/s"  # noqa: E731
    fla = row["fla"]
    fs = (f"fla fused_recurrent loop {fla[0] * 1e3:.1f} us, graph {g(fla[1])}" if isinstance(fla, tuple)
          else f"fla: {fla}")
    return (f"graph: kernel {g(row['kernel_graph'])}, op unchecked {g(row['unchecked_graph'])}; loop: kernel "
            f"{row['kernel'] * 1e3:.1f} us, op {row['op'] * 1e3:.1f} us checked, {row['unchecked'] * 1e3:.1f} "
            f"unchecked; {fs}")


if __name__ == "__main__":
    main()
