"""The checker: prove or refute what codegen needs to know about a rule.

1. Structure (linearize.py): S' = A S + B with A = D + sum u w^T on the key
   side, B = c k v^T, o = S'^T q. This proposes a transition class and the
   expressions of its gate, key, value, beta.
2. Proof (sympy, K=3, V=2 with symbolic entries): S' is affine in S, the
   Jacobian acts on the key side only (same A for every value column), and the
   class template rebuilt from the proposed expressions equals the rule's A, B
   and read-out. Equalities are proved by expansion, or else checked at random
   points with 40-digit arithmetic (the verdict says which).
3. The chunk form of the class equals the recurrence on C=3 symbolic tokens
   (once per class, exact rational arithmetic).
4. Bounds (log-gate <= 0 from the parameterization, eigenvalues of delta
   transitions) and element-wise derivatives of every preprocessing expression.
"""
from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import sympy as sp

from . import ir, symbolic
from .errors import RuleError
from .linearize import KOp, LinMat, LinVec, NotLinear, as_outer, linearize
from .rule import InputSpec, Rule

CLASSES = ("identity", "scalar", "diagonal", "delta", "scalar_delta", "diagonal_delta", "dplr", "recurrent_only")
CHUNK_CLASSES = ("identity", "scalar", "diagonal", "delta", "scalar_delta", "diagonal_delta", "dplr")
GATE_OF = {"identity": "none", "scalar": "scalar", "diagonal": "diagonal", "delta": "none",
           "scalar_delta": "scalar", "diagonal_delta": "diagonal"}
MAX_STATE_DEPTH = 250           # operations on the state in a row that the checker walks (recursively)


@dataclass(frozen=True)
class Facts:
    """What the checker established about a rule; codegen reads only this and the IR."""
    rule: str
    transition: str
    forms: tuple[str, ...]                    # kernel forms the rule supports
    reason: str                               # why chunk is unavailable ('' when it is)
    reason_line: int                          # the rule line behind `reason`
    inputs: tuple[InputSpec, ...]
    query: ir.Node | None = None              # K-vector read by o = S^T query
    key: ir.Node | None = None                # write key (B = key value^T)
    value: ir.Node | None = None              # write value (beta folded in for non-delta classes)
    log_gate: ir.Node | None = None           # scalar or K-vector log decay; None = no decay
    beta: ir.Node | None = None               # delta strength (delta classes)
    lowrank: tuple[ir.Node, ir.Node] | None = None   # dplr: A = Diag(exp(log_gate)) + a b^T
    bounds: dict = field(default_factory=dict)
    runtime_checks: tuple[tuple[str, str, str], ...] = ()  # (input, '<= 0' | 'in (0, 1]', why)
    derivatives: dict = field(default_factory=dict)   # fact -> input -> IR of d fact / d input (element-wise)
    proofs: tuple[str, ...] = ()

    @property
    def gate(self) -> str:
        return GATE_OF.get(self.transition, "none")

    @property
    def delta(self) -> bool:
        return self.transition in ("delta", "scalar_delta", "diagonal_delta")


_CACHE: "weakref.WeakKeyDictionary[Rule, Facts]" = weakref.WeakKeyDictionary()


def check(r: Rule) -> Facts:
    """Facts of a rule, computed once per rule object."""
    if not isinstance(r, Rule):
        raise TypeError(f"check: expected a rule declared with @unifattn.dsl.rule; got {type(r).__name__} "
                        "(selectors are checked when declared). Fix: pass a rule, e.g. check(unifattn.rules.kda)")
    facts = _CACHE.get(r)
    if facts is None:
        deep = _state_depth(r)
        if deep <= MAX_STATE_DEPTH:
            try:
                facts = _CACHE[r] = _check(r)
            except RecursionError:      # the structural walk (linearize) and sympy recurse on depth
                pass
        if facts is None:
            raise RuleError(r.name, r.where, f"an update of the state at most {MAX_STATE_DEPTH} operations deep "
                            "(the checker walks it recursively)", f"one {deep} operations deep",
                            "apply fewer steps per token, or fold repeated steps into one (0.9 ** n * S for n "
                            "decays)")
    return facts


def _state_depth(r: Rule) -> int:
    """Longest chain of operations on the state in the update and the read-out."""
    memo: dict[int, int] = {}
    for n in ir.walk([r.new_state, r.output]):
        below = [memo[id(a)] for a in n.args if memo[id(a)]]
        memo[id(n)] = 1 if n.op == "state" else 1 + max(below) if below else 0
    return max(memo[id(r.new_state)], memo[id(r.output)])


def _check(r: Rule) -> Facts:
    rng = random.Random(0)
    K, V = r.state_dims
    dims = {K: 3, V: 2}
    env = symbolic.instance_env(r.inputs, dims)
    S = sp.Matrix(3, 2, lambda i, j: sp.Symbol(f"S{i}{j}", real=True))
    env["S"] = S
    env["__opaque__"] = symbolic.opaque_values([r.new_state, r.output], r.statements, dims)
    memo: dict = dict(env["__opaque__"])
    try:
        S_new = symbolic.evaluate(r.new_state, env, memo)
        o = symbolic.evaluate(r.output, env, memo)
    except symbolic.Undefined as e:
        raise RuleError(r.name, f"{r.file}:{e.node.line or r.line}", "values defined for every input", e.why,
                        "remove that division / log, or add a positive term to what is 0") from None
    proofs = []

    # -- (2a) affine with a key-side, column-shared transition (sympy, independent of linearize).
    # When the structural form exists the entries are linear in S and the Jacobian test is
    # symbolic; otherwise S' may be a large polynomial, and affinity is refuted (or confirmed)
    # exactly at random rational points instead of expanding it.
    s_syms = list(S)
    try:
        linearize(r.new_state, _state_leaf(r))
        structural = True
    except NotLinear:
        structural = False
    if structural:
        J = {(i, j, kk, l): sp.diff(S_new[i, j], S[kk, l]) for i in range(3) for j in range(2)
             for kk in range(3) for l in range(2)}
        # affine: every second derivative is 0; only those of Jacobian entries that still hold a state symbol
        # are taken (a deep rule's 216 second derivatives of unexpanded entries took most of its check)
        s_set = set(s_syms)
        affine = all(sp.diff(d, b) == 0 or symbolic.is_zero(sp.diff(d, b), None, rng) is not None
                     for d in J.values() for b in d.free_symbols & s_set)
        off = [J[i, j, kk, l] for (i, j, kk, l) in J if j != l]
        same = [J[i, 0, kk, 0] - J[i, 1, kk, 1] for i in range(3) for kk in range(3)]
        shared = affine and symbolic.all_zero(off + same, rng) is not None
        how = "sympy, K=3, V=2"
    else:
        affine, shared = _numeric_affine(r, env, rng)
        how = "40-digit arithmetic at random points, K=3, V=2"
    proofs.append(f"S' affine in S: {'yes' if affine else 'no'}; transition shared by value columns: "
                  f"{'yes' if shared else 'no'} ({how})")

    # -- (1) structure
    try:
        lin = linearize(r.new_state, _state_leaf(r))
        if not isinstance(lin, LinMat):
            raise NotLinear(r.new_state, "the new state is not a [K, V] matrix affine in S")
        out = linearize(r.output, r.new_state)
        if not isinstance(out, LinVec) or out.r is None or out.b is not None:
            raise NotLinear(r.output, f"the read-out {ir.to_text(r.output)} is not S^T q for a state-free q")
    except NotLinear as e:
        if affine and shared:
            why = f"affine, but {e.why}"
        elif not affine:
            why = f"not affine in the state: {e.why}"
        else:
            why = f"the transition mixes value columns: {e.why}"
        return _recurrent_only(r, why, e.node.line or r.line, proofs)
    if not (affine and shared):  # pragma: no cover - linearize and sympy disagree: a checker bug
        raise AssertionError(f"{r.name}: structural form found but sympy says affine={affine} shared={shared}")

    A, B = lin.A, lin.B
    rb = as_outer(B)
    if rb is None:
        return _recurrent_only(r, f"the write B = {ir.to_text(B) if B is not None else '0'} is not a rank-one "
                                  "k v^T term", r.new_state.line, proofs)
    c, kb, vb = rb
    cls, facts = _classify(A, c, kb, vb, env, rng)
    if cls is None:
        return _recurrent_only(r, facts, r.new_state.line, proofs)
    facts["query"] = out.r

    # -- (2b) the class template rebuilt from the facts equals the rule (A, B, read-out)
    A_rule = sp.Matrix(3, 3, lambda i, kk: sp.diff(S_new[i, 0], S[kk, 0]))
    B_rule = S_new.xreplace({s: sp.Integer(0) for s in s_syms})   # subs compares subtrees: minutes on deep rules
    try:
        A_t, B_t = _template(cls, facts, env)
    except symbolic.Undefined:          # e.g. the log of a decay that is identically 0
        A_t = None
    if not isinstance(A_t, sp.MatrixBase):   # (no .has() walk: nested reuse makes the trees exponential)
        # e.g. S = 0 * S + ...: the decay is identically 0, its log-gate -oo; no chunk template holds it
        return _recurrent_only(r, f"its transition has no finite '{cls}' log-gate (a decay "
                                  "that is identically 0 forgets the state every step)", r.new_state.line, proofs)
    q_eff = symbolic.evaluate(out.r, env)
    o_t = S_new.T * q_eff
    v = symbolic.all_zero(list(A_rule - A_t) + list(B_rule - B_t) + list(o - o_t), rng)
    if v is None:
        if env["__opaque__"]:   # large statements were abstracted and the template needs their insides
            return _recurrent_only(r, f"its expressions are too large to prove the '{cls}' chunk form "
                                      "(nested reuse makes them grow exponentially)", r.new_state.line, proofs)
        raise AssertionError(f"{r.name}: class template {cls} does not match the rule")  # pragma: no cover
    proofs.append(f"rule == {cls} template (A, B, read-out): {v}")
    forms = ("chunk", "recurrent") if cls in CHUNK_CLASSES else ("recurrent",)
    if cls in CHUNK_CLASSES:
        proofs.append(f"chunk form of '{cls}' == recurrence on 3 symbolic tokens: {chunk_identity(cls)}")
    bounds, runtime = _bounds(cls, facts, r)
    reason = "" if "chunk" in forms else f"no chunk template for '{cls}' yet"
    if "chunk" in forms and bounds.get("log_gate <= 0", "").startswith("not proved"):
        # the chunk kernels take logs of the decays: a negative or > 1 decay would turn into NaN or
        # growth there and silently wrong outputs, while the recurrent form is exact for any decay
        forms, reason = ("recurrent",), (
            "its decay (exp of the log-gate) is not proved to lie in (0, 1] and is computed "
            "inside the rule, so no call-time check can guard the chunk kernels; parameterize it so it is "
            "provably in (0, 1] (e.g. sigmoid(x) or exp(-softplus(x))), or take the decay or its log as an input "
            "(checked at every call)")
    f = Facts(r.name, cls, forms, reason, 0, r.inputs,
              bounds=bounds, runtime_checks=runtime, proofs=tuple(proofs), **facts)
    return _with_derivatives(f, r)


def _numeric_affine(r: Rule, env: dict, rng: random.Random) -> tuple[bool, bool]:
    """Affinity / column sharing of S -> S' at random rational inputs and states (exact for rational maps).

    An affine map f satisfies f(S1 + S2) + f(0) = f(S1) + f(S2) and f(2 S1) + f(0) = 2 f(S1); a map
    acting on the key side only has f(E_kl) - f(0) zero outside column l, and equal in every column.
    A map undefined at one of these points (S' = k v^T / S at S = 0) is not affine.
    """
    def rand():
        return sp.Float(rng.uniform(-1.5, 1.5), 40)

    def zero(M) -> bool:
        return all((y := sp.N(x, 40)).is_finite and abs(y) < 1e-25 for x in M)
    vals = {}
    for name, x in env.items():
        if name == "S" or name.startswith("__"):
            continue
        vals[name] = x.applyfunc(lambda _: rand()) if isinstance(x, sp.MatrixBase) else rand()

    def f(Sv):
        return symbolic.evaluate(r.new_state, {**vals, "S": Sv})
    Z = sp.zeros(3, 2).applyfunc(lambda x: sp.Float(x, 40))   # Floats: activations evaluate, never nest
    S1, S2 = (sp.Matrix(3, 2, lambda i, j: rand()) for _ in range(2))
    try:
        f0 = f(Z)
        affine = zero(f(S1 + S2) + f0 - f(S1) - f(S2)) and zero(f(2 * S1) + f0 - 2 * f(S1))
        if not affine:
            return False, False
        cols = {}
        for kk in range(3):
            for l in range(2):
                E = Z.copy()
                E[kk, l] = sp.Float(1, 40)
                cols[kk, l] = f(E) - f0
    except ZeroDivisionError:
        return False, False
    shared = zero([cols[kk, l][i, j] for (kk, l) in cols for i in range(3) for j in range(2) if j != l]) and \
        zero([cols[kk, 0][i, 0] - cols[kk, 1][i, 1] for kk in range(3) for i in range(3)])
    return True, bool(shared)


def _state_leaf(r: Rule) -> ir.Node:
    for n in ir.walk([r.new_state, r.output]):
        if n.op == "state":
            return n
    return ir.Node("state", shape=r.state_dims)


def _recurrent_only(r, why, line, proofs) -> Facts:
    return Facts(r.name, "recurrent_only", ("recurrent",), why, line, r.inputs, proofs=tuple(proofs),
                 bounds={"note": "recurrent_only: no chunk-form bounds"})


def _log(d: ir.Node) -> ir.Node:
    return ir.unary("log", d)


def _classify(A: KOp, c, kb, vb, env, rng):
    """Class and fact expressions from the canonical A = D + sum u w^T and B = c kb vb^T."""
    value = ir.binary("mul", c, vb)
    if not A.lowrank:
        if A.kind == "zero":
            return None, "the transition is zero (the state is overwritten each step)"
        if A.kind == "one":
            return "identity", dict(key=kb, value=value)
        gate = _log(A.d)
        return ("scalar" if A.kind == "scalar" else "diagonal"), dict(key=kb, value=value, log_gate=gate)
    if len(A.lowrank) > 1:
        A = _merge_lowrank(A, env, rng)
    if len(A.lowrank) > 1:
        return None, f"the transition has {len(A.lowrank)} low-rank terms; templates take one"
    (u, w), = A.lowrank
    U, W = symbolic.evaluate(u, env), symbolic.evaluate(w, env)
    Kb, C = symbolic.evaluate(kb, env), symbolic.evaluate(c, env)
    uw = U * W.T
    if A.kind == "one":
        cand, cls = -C * Kb * Kb.T, "delta"
    elif A.kind == "scalar":
        cand, cls = -symbolic.evaluate(A.d, env) * C * Kb * Kb.T, "scalar_delta"
    elif A.kind == "diag":
        Dd = symbolic.evaluate(A.d, env)
        cand, cls = -C * Kb * sp.Matrix([Kb[i] * Dd[i] for i in range(len(Kb))]).T, "diagonal_delta"
    else:
        cand, cls = None, None
    if cand is not None and symbolic.all_zero(list(uw - cand), rng) is not None:
        facts = dict(key=kb, value=vb, beta=c)
        if A.kind != "one":
            facts["log_gate"] = _log(A.d)
        return cls, facts
    if A.kind == "scalar" and symbolic.all_zero(list(uw + C * Kb * Kb.T), rng) is not None:
        # a delta write followed by a scalar decay a: A = a I - c' k k^T, B = c' k v^T with c' = a beta,
        # i.e. a (I - beta k k^T) S + beta k (a v)^T: the scalar_delta template with value a v
        beta = ir.binary("div", c, A.d)
        return "scalar_delta", dict(key=kb, value=ir.binary("mul", A.d, vb), beta=beta, log_gate=_log(A.d))
    gate = None if A.kind in ("one", "zero") else _log(A.d)
    if A.kind == "zero":
        return None, "the transition is pure low rank (no diagonal part)"
    return "dplr", dict(key=kb, value=value, log_gate=gate, lowrank=(u, w))


def _merge_lowrank(A: KOp, env, rng) -> KOp:
    """Merge terms sharing a left vector: u w1^T + u w2^T = u (w1 + w2)^T."""
    terms = list(A.lowrank)
    merged = [terms[0]]
    for u, w in terms[1:]:
        U = symbolic.evaluate(u, env)
        for i, (u0, w0) in enumerate(merged):
            if symbolic.all_zero(list(U - symbolic.evaluate(u0, env)), rng) is not None:
                merged[i] = (u0, ir.binary("add", w0, w))
                break
        else:
            merged.append((u, w))
    return KOp(A.kind, A.d, tuple(merged))


def _template(cls, f, env):
    """A and B of the class template, evaluated on the instance."""
    k = symbolic.evaluate(f["key"], env)
    v = symbolic.evaluate(f["value"], env)
    n = k.shape[0]
    I = sp.eye(n)
    if f.get("log_gate") is not None:
        g = symbolic.evaluate(f["log_gate"], env)
        D = sp.diag(*[sp.exp(x) for x in g]) if isinstance(g, sp.MatrixBase) else sp.exp(g) * I
    else:
        D = I
    if cls in ("delta", "scalar_delta", "diagonal_delta"):
        b = symbolic.evaluate(f["beta"], env)
        return (I - b * k * k.T) * D, b * k * v.T
    if cls == "dplr":
        a_, b_ = (symbolic.evaluate(x, env) for x in f["lowrank"])
        return D + a_ * b_.T, k * v.T
    return D, k * v.T


# ------------------------------------------------------------------ chunk identity (per class, exact)
_CHUNK_PROOF: dict[str, str] = {}


def chunk_identity(cls: str) -> str:
    """Prove the chunk form of ALGORITHMS.md §2 equals the recurrence, C=3 tokens, K=2, V=1."""
    if cls in _CHUNK_PROOF:
        return _CHUNK_PROOF[cls]
    if cls == "dplr":
        _CHUNK_PROOF[cls] = _dplr_identity()
        return _CHUNK_PROOF[cls]
    C, K = 3, 2
    gate, delta = GATE_OF[cls], cls.endswith("delta")
    q = sp.Matrix(C, K, lambda t, i: sp.Symbol(f"q{t}{i}"))
    k = sp.Matrix(C, K, lambda t, i: sp.Symbol(f"k{t}{i}"))
    v = sp.Matrix(C, 1, lambda t, i: sp.Symbol(f"v{t}"))
    beta = [sp.Symbol(f"b{t}") if delta else 1 for t in range(C)]
    if gate == "none":
        a = sp.ones(C, K)
    elif gate == "scalar":
        a = sp.Matrix(C, K, lambda t, i: sp.Symbol(f"a{t}", positive=True))
    else:
        a = sp.Matrix(C, K, lambda t, i: sp.Symbol(f"a{t}{i}", positive=True))
    H0 = sp.Matrix(K, 1, lambda i, j: sp.Symbol(f"h{i}"))
    # recurrence
    H, O_rec = H0, []
    for t in range(C):
        kt = k[t, :].T
        At = sp.diag(*a[t, :])
        if delta:
            At = (sp.eye(K) - beta[t] * kt * kt.T) * At
        H = At * H + beta[t] * kt * v[t, :]
        O_rec.append((H.T * q[t, :].T)[0])
    # chunk form (KDA-style, per-channel Gamma; scalar / no gate are special cases)
    G = sp.Matrix(C, K, lambda t, i: sp.Mul(*[a[s, i] for s in range(t + 1)]))   # gamma_t = prod alpha
    Qg = sp.Matrix(C, K, lambda t, i: q[t, i] * G[t, i])
    Kg = sp.Matrix(C, K, lambda t, i: k[t, i] * G[t, i])
    Ki = sp.Matrix(C, K, lambda t, i: k[t, i] / G[t, i])
    Kend = sp.Matrix(C, K, lambda t, i: k[t, i] * G[C - 1, i] / G[t, i])
    if delta:
        bd = sp.diag(*beta)
        Akk = sp.Matrix(C, C, lambda i, j: (bd * Kg * Ki.T)[i, j] if i > j else 0)
        M = (sp.eye(C) + Akk).inv() * bd
        W, U = M * Kg, M * v
        Vn = U - W * H0
    else:
        Vn = v
    Aqk = sp.Matrix(C, C, lambda i, j: (Qg * Ki.T)[i, j] if i >= j else 0)
    O_chunk = Qg * H0 + Aqk * Vn
    H_chunk = sp.diag(*G[C - 1, :]) * H0 + Kend.T * Vn
    diffs = [O_rec[t] - O_chunk[t] for t in range(C)] + list(H - H_chunk)
    ok = all(sp.simplify(sp.together(d)) == 0 for d in diffs)
    _CHUNK_PROOF[cls] = "proved" if ok else "FAILED"
    return _CHUNK_PROOF[cls]


def _dplr_identity() -> str:
    """The DPLR chunk form of kernels/chunk_dplr.py against S_t = (Diag(alpha_t) + a_t b_t^T) S_{t-1} + k_t v_t,
    C=3 tokens, K=2, V=1, every entry a symbol."""
    C, K = 3, 2
    sym = lambda n: sp.Matrix(C, K, lambda t, i: sp.Symbol(f"{n}{t}{i}"))  # noqa: E731
    q, k, a, b = sym("q"), sym("k"), sym("a"), sym("b")
    al = sp.Matrix(C, K, lambda t, i: sp.Symbol(f"al{t}{i}", positive=True))
    v = sp.Matrix(C, 1, lambda t, i: sp.Symbol(f"v{t}"))
    H0 = sp.Matrix(K, 1, lambda i, j: sp.Symbol(f"h{i}"))
    H, O_rec = H0, []
    for t in range(C):
        H = sp.diag(*al[t, :]) * H + a[t, :].T * (b[t, :] * H) + k[t, :].T * v[t, :]
        O_rec.append((H.T * q[t, :].T)[0])
    G = sp.Matrix(C, K, lambda t, i: sp.Mul(*[al[s, i] for s in range(t + 1)]))     # inclusive
    Gx = sp.Matrix(C, K, lambda t, i: sp.Mul(*[al[s, i] for s in range(t)]))        # exclusive
    Qg = q.multiply_elementwise(G)
    Bx = b.multiply_elementwise(Gx)
    Ad = sp.Matrix(C, K, lambda t, i: a[t, i] / G[t, i])
    Kd = sp.Matrix(C, K, lambda t, i: k[t, i] / G[t, i])
    low = lambda M, strict: sp.Matrix(C, C, lambda i, j: M[i, j] if (i > j if strict else i >= j) else 0)  # noqa: E731
    A_ab, A_bk = low(Bx * Ad.T, True), low(Bx * Kd.T, True)
    A_qa, A_qk = low(Qg * Ad.T, False), low(Qg * Kd.T, False)
    P = (sp.eye(C) - A_ab).inv() * (Bx * H0 + A_bk * v)
    O_chunk = Qg * H0 + A_qa * P + A_qk * v
    end = lambda X: sp.Matrix(C, K, lambda t, i: X[t, i] * G[C - 1, i] / G[t, i])  # noqa: E731
    H_chunk = sp.diag(*G[C - 1, :]) * H0 + end(a).T * P + end(k).T * v
    diffs = [O_rec[t] - O_chunk[t] for t in range(C)] + list(H - H_chunk)
    return "proved" if all(sp.simplify(sp.together(d)) == 0 for d in diffs) else "FAILED"


# ------------------------------------------------------------------ bounds
_INTERVAL_MAX_NODES = 2000


def _real_line_range(expr, simplify: bool = False):
    """The values of expr as every symbol ranges over the whole real line, by interval arithmetic (sympy
    AccumBounds; an outer enclosure): an AccumBounds, a single value, or None where no range came out
    (an error, or a tree too large: nested reuse grows it exponentially, so it is counted, not printed)."""
    for i, _ in enumerate(sp.preorder_traversal(expr)):
        if i > _INTERVAL_MAX_NODES:
            return None
    sub = {sym: sp.AccumBounds(-sp.oo, sp.oo) for sym in expr.free_symbols}
    try:
        rng = expr.subs(sub).rewrite(sp.exp) if simplify else expr.rewrite(sp.exp).subs(sub)
        return sp.simplify(rng) if simplify else rng
    except Exception:  # noqa: BLE001 - interval arithmetic is best effort
        return None


def _interval_nonpositive(expr) -> bool:
    """expr <= 0 for every real value of its symbols (True is a proof): e.g. log(sigmoid(x)) ->
    log([0, 1]) = [-oo, 0], which sympy's sign assumptions alone do not see."""
    rng = _real_line_range(expr)
    if isinstance(rng, sp.AccumBounds):
        return (rng.max <= 0) is sp.true
    return rng is not None and rng.is_extended_real is True and rng.is_nonpositive is True


def _bounds(cls, f, r: Rule):
    bounds, runtime = {}, []
    g = f.get("log_gate")
    if g is not None:
        expr = symbolic.elementwise(g)
        ok = expr is not None and (expr.is_nonpositive is True or _interval_nonpositive(expr))
        if ok:
            bounds["log_gate <= 0"] = "proved from the parameterization"
        elif g.op in ("input", "param"):
            bounds["log_gate <= 0"] = (f"not implied: input '{g.name}' is used as a log-gate "
                                       "(checked at call time by the chunk and recurrent forms)")
            runtime.append((g.name, "<= 0", "it is a log-gate: exp of it must be a decay in (0, 1]"))
        elif g.op == "log" and g.args[0].op in ("input", "param"):
            name = g.args[0].name
            bounds["log_gate <= 0"] = (f"not implied: '{name}' is used as a decay "
                                       "(checked at call time by the chunk and recurrent forms)")
            runtime.append((name, "in (0, 1]", "it is a decay factor"))
        else:   # no proof and nothing to scan at call time: the chunk form is refused (_chunk_refusal)
            bounds["log_gate <= 0"] = ("not proved, and computed inside the rule (no input to check at call "
                                       "time): the chunk kernels need decays in (0, 1]; recurrent form only")
    if cls.endswith("delta"):
        beta = f["beta"]
        key = f["key"]
        unit = key.op == "l2norm"
        e = symbolic.elementwise(beta)
        rng_b = None if e is None else _real_line_range(e, simplify=True)
        bstr = str(rng_b) if isinstance(rng_b, sp.AccumBounds) else "unbounded"
        if unit and isinstance(rng_b, sp.AccumBounds) and rng_b.min.is_finite and rng_b.max.is_finite:
            lo = 1 - rng_b.max
            bounds["eig(I - beta k k^T)"] = f"in [{sp.nsimplify(lo)}, 1] (|k| < 1 by l2norm, beta in {bstr})"
        else:
            why = "k is not normalized" if not unit else f"beta in {bstr}"
            bounds["eig(I - beta k k^T)"] = f"1 and 1 - beta |k|^2; not bounded: {why}; keep beta |k|^2 in [0, 2]"
    return bounds, tuple(runtime)


def _with_derivatives(f: Facts, r: Rule) -> Facts:
    shapes = {s.name: (s.kind, s.shape) for s in r.inputs}
    ders = {}
    for name in ("log_gate", "beta", "key", "value", "query"):
        node = getattr(f, name)
        if node is None:
            continue
        e = symbolic.elementwise(node)
        if e is None:
            ders[name] = ("not element-wise (l2norm / reductions), or too large as a tree: left to the "
                          "kernels' building blocks")
            continue
        ders[name] = {s.name: symbolic.to_ir(sp.diff(e, s), shapes) for s in sorted(e.free_symbols, key=str)}
    return Facts(**{**f.__dict__, "derivatives": ders})


def require_chunk(r: Rule, facts: Facts):
    """Raise a RuleError pointing at the rule line that keeps it from the chunk form."""
    if "chunk" in facts.forms:
        return
    line = facts.reason_line or r.line
    raise RuleError(r.name, f"{r.file}:{line}", f"a rule whose update is one of {CHUNK_CLASSES} for form='chunk'",
                    f"class '{facts.transition}': {facts.reason}",
                    "use form='recurrent' (every rule has it), or rewrite the update as S = A S + k v^T "
                    "with A diagonal and/or a delta-rule term")
