"""Time and memory of one expert FFN (d -> ffn -> d), as ratios to the dense FFN of the same run.

Variants (all :class:`meo_fairseq.modules.MoEFFN`, experts in every FFN linear, GELU):

=============  =====================================================================================
``dense``      ``MoEConfig(mode="dense")``: the plain FFN
``moe-token``  vanilla top-k MoE, per-token routing (Switch/GShard; every token runs k experts)
``moe-seq``    top-k MoE with one gate per sequence, compute-then-mix (k experts over every token)
``meo``        MEO: one gate per sequence, merge the k experts, one matmul (``mode="meo"``)
``meo-token``  token-level MEO: MEO plus the per-token bottleneck block (``level="token"``)
=============  =====================================================================================

Measures
--------
* ``fwd``: median wall time of an inference forward (``eval()``, ``no_grad``).
* ``fwd+bwd``: median wall time of a training step's forward and backward (``train()``, input
  requiring grad as inside a network, loss = <y, fixed random probe> + the routers' auxiliary
  losses, parameter gradients reset to None before every step).
  Variants are interleaved inside every repeat, so that a slow period of a shared machine hits
  them all alike.
* ``peak``: peak training memory, excluding parameter gradients. One forward+backward runs under
  ``torch.profiler`` with ``profile_memory=True``; from its allocation events (address, bytes,
  in order) the live bytes of the tensors allocated during the step are tracked, and the maximum
  is taken, leaving out the allocations that end up as a parameter's ``.grad``. Parameter
  gradients are left out because they are N times the dense ones by design (N experts), the
  same as the parameters; what the measure compares is the working and activation memory that
  a layer's implementation decides (for MEO: merged weights, saved tensors, backward buffers).
  The scratch memory that MEO keeps between calls (``modules.buffers.scratch``, allocated in the
  warm-up step) and the output and input-gradient memory that vanilla MoE's linears keep
  (``GradBuffer`` slots) are added whole, as if they were live for the whole step.
  The allocator-level definition is the same on CPU and CUDA.
* ``floor`` (MEO): the memory traffic that any implementation of an MEO training step adds to
  the dense one, timed with plain streaming ops in the same run. With fp32 experts and
  materialised gradients, the N stacked experts of both linears are read at least once in forward
  (to merge) and once in backward (to merge again, or to read saved merged weights, and for the
  gate gradient), and their N-expert gradients are written once. ``read`` times a sum over the
  experts, ``write`` a fill of memory written before (no page faults). The floor ratios are
  ``1 + read / dense fwd`` and ``1 + (2 read + write) / dense fwd+bwd``: an MEO implementation
  gets below them only if its matmuls beat the dense ones or if it hides that traffic behind its
  matmuls (a merge fused into a GEMM that streams the experts while it computes; the libraries
  torch uses here have no such kernel).
* ``saved``: bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each
  storage counted once, parameters left out): the activation memory of the layer.

* ``ops``: aten ops dispatched by one training step (forward, auxiliary loss, backward), counted
  with a ``TorchDispatchMode``: all ops, and the non-view ops (``OpOverload.is_view`` False), for
  the implementation the run uses and for ``impl="reference"``.
* ``graph breaks``: ``torch._dynamo.explain`` of one training forward with the run's options (a
  layer under ``torch.compile`` takes the compile-friendly reference path by itself).
* ``compiled`` (``--compile``, the default with ``--device cuda``): every variant again under
  ``torch.compile`` (forward, and forward+backward), as ratios to the eager dense FFN of the run.

Every number is also given as a ratio to ``dense`` measured in the same run.
"""

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..modules import MoEConfig, MoEFFN, Router, set_impl
from ..modules.buffers import GradBuffer, release_scratch, scratch_bytes

VARIANTS = ("dense", "moe-token", "moe-seq", "meo", "meo-token")
SHAPES = ((16, 128), (4, 512))
CUDA_SHAPES = ((32, 128), (8, 512))  # BERT-base batches (issue 15's GPU targets)
# The efficiency goals (method notes, section 5), checked at the default shapes.
TARGETS = [
    # (variant, metric, shape or None for every shape, bound)
    ("meo", "fwd_bwd", (16, 128), 1.3),
    ("meo", "fwd_bwd", (4, 512), 1.1),
    ("meo", "fwd_bwd", (32, 128), 1.3),
    ("meo", "fwd_bwd", (8, 512), 1.15),
    ("meo:compiled", "fwd_bwd", (32, 128), 1.3),
    ("meo:compiled", "fwd_bwd", (8, 512), 1.15),
    ("moe-token:compiled", "fwd_bwd", None, 4.5),
    ("meo", "fwd", (16, 128), 1.3),
    ("moe-token", "fwd_bwd", None, 4.5),
    ("meo", "peak", None, 1.3),
]


def variant_config(variant: str, experts: int, top_k: int, impl: str = "auto") -> MoEConfig:
    if variant == "dense":
        return MoEConfig(mode="dense")
    common = dict(experts=experts, top_k=top_k, expert_unit="linear", impl=impl)
    if variant == "moe-token":
        return MoEConfig(mode="moe", level="token", routing="token", **common)
    if variant == "moe-seq":
        return MoEConfig(mode="moe", level="sequence", routing="sequence", **common)
    if variant == "meo":
        return MoEConfig(mode="meo", level="sequence", routing="sequence", **common)
    if variant == "meo-token":
        return MoEConfig(mode="meo", level="token", routing="sequence", **common)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def build(
    variant: str,
    dim: int,
    ffn: int,
    experts: int,
    top_k: int,
    device,
    dtype,
    seed: int = 0,
    impl: str = "auto",
) -> MoEFFN:
    torch.manual_seed(seed)
    m = MoEFFN(dim, ffn, variant_config(variant, experts, top_k, impl), activation_fn=F.gelu)
    with torch.no_grad():  # routers start at zero (upcycling); random routers route like trained ones
        for r in m.modules():
            if isinstance(r, Router):
                r.w_gate.normal_(0.0, dim**-0.5 * 4)
                r.w_noise.normal_(0.0, dim**-0.5)
    return m.to(device=device, dtype=dtype)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _aux(m) -> torch.Tensor:
    losses = [r.aux_loss for r in m.routers() if r.aux_loss is not None]
    return sum(losses) if losses else 0.0


def _train_step(m, x, probe):
    for p in m.parameters():
        p.grad = None
    xi = x.detach().requires_grad_(True)
    y = m(xi)
    loss = (y.float() * probe).sum() + _aux(m)
    loss.backward()


@torch.no_grad()
def _forward(m, x):
    return m(x)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_variants(
    models: Dict[str, MoEFFN], x, repeats: int, warmup: int = 1, clock: str = "wall"
) -> Dict[str, Dict[str, float]]:
    """Median seconds of forward (eval, no grad) and forward+backward (train), interleaved."""
    device = x.device
    now = CLOCKS[clock]
    probe = torch.randn(x.shape[:-1] + (next(iter(models.values())).fc2.experts.out_features,), device=device)
    times = {v: {"fwd": [], "fwd_bwd": []} for v in models}
    for rep in range(warmup + repeats):
        for v, m in models.items():
            m.eval()
            _sync(device)
            t0 = now()
            _forward(m, x)
            _sync(device)
            t1 = now()
            m.train()
            _train_step(m, x, probe)
            _sync(device)
            t2 = now()
            if rep >= warmup:
                times[v]["fwd"].append(t1 - t0)
                times[v]["fwd_bwd"].append(t2 - t1)
    return {v: {k: statistics.median(ts) for k, ts in d.items()} for v, d in times.items()}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.all = self.non_view = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all += 1
        self.non_view += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(m: MoEFFN, x, probe, impl: Optional[str] = None) -> Dict[str, int]:
    """aten ops of one training step (forward, auxiliary loss, backward): {"all", "non_view"}.

    impl: count with this implementation (the layer's own is restored afterwards)."""
    old = [(mod, mod.impl) for mod in m.modules() if hasattr(mod, "impl")]
    old += [(mod, mod.reference) for mod in m.modules() if isinstance(mod, Router)]
    try:
        if impl is not None:
            set_impl(m, impl)
        m.train()
        _train_step(m, x, probe)  # warm up (lazy init)
        with _OpCounter() as c:
            _train_step(m, x, probe)
    finally:
        for mod, v in old:
            if isinstance(mod, Router):
                mod.reference = v
            else:
                mod.impl = v
    for p in m.parameters():
        p.grad = None
    return {"all": c.all, "non_view": c.non_view}


def graph_breaks(m: MoEFFN, x) -> Dict[str, int]:
    """Graphs and graph breaks of one training forward under torch.compile (torch._dynamo.explain)."""
    import torch._dynamo

    torch._dynamo.reset()
    m.train()
    e = torch._dynamo.explain(lambda inp: m(inp))(x.detach().requires_grad_(True))
    torch._dynamo.reset()
    return {"graphs": e.graph_count, "breaks": e.graph_break_count}


def peak_memory(m: MoEFFN, x, probe) -> int:
    """Peak bytes allocated during one training step, parameter gradients left out (see above)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(x.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    m.train()
    release_scratch()  # (scratch memory kept from another variant's run is not this one's)
    _train_step(m, x, probe)  # warm up (lazy init, allocator caches)
    for p in m.parameters():
        p.grad = None
    _sync(dev)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        _train_step(m, x, probe)
        _sync(dev)
    grads = {p.grad.data_ptr() for p in m.parameters() if p.grad is not None}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            trace = json.load(fh)
    dev_type = 1 if dev.type == "cuda" else 0
    events = []
    for e in trace.get("traceEvents", []):
        if e.get("name") != "[memory]":
            continue
        a = e.get("args", {})
        if int(a.get("Device Type", 0)) != dev_type:
            continue
        events.append((float(e["ts"]), int(a.get("Ev Idx", 0)), int(a["Addr"]), int(a["Bytes"])))
    events.sort()
    # live allocations made in the window: addr -> (bytes, index of the allocation event)
    live: Dict[int, tuple] = {}
    for i, (_, _, addr, nbytes) in enumerate(events):
        if nbytes > 0:
            live[addr] = (nbytes, i)
        elif addr in live:
            del live[addr]
    grad_allocs = {live[a][1] for a in grads if a in live}  # still alive at the end, became .grad
    cur = peak = 0
    sizes = {}
    for i, (_, _, addr, nbytes) in enumerate(events):
        if nbytes > 0:
            if i in grad_allocs:
                continue
            sizes[addr] = nbytes
            cur += nbytes
        elif addr in sizes:
            cur -= sizes.pop(addr)
        peak = max(peak, cur)
    # the scratch storage (buffers.scratch) and the kept outputs and input gradients (the
    # GradBuffer slots other than the weight gradient) were allocated in the warm-up and stay
    # allocated: they are part of the layer's working memory for the whole step
    return peak + scratch_bytes() + kept_bytes(m)


def kept_bytes(m) -> int:
    """Bytes the layer's GradBuffers keep between steps besides the weight gradients."""
    return sum(
        mod.grad_buffer.kept_bytes()
        for mod in m.modules()
        if isinstance(getattr(mod, "grad_buffer", None), GradBuffer)
    )


def saved_bytes(m: MoEFFN, x) -> int:
    """Bytes saved for backward by one training forward (storages counted once, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    m.train()
    xi = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(xi)
    del y
    return sum(seen.values())


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def traffic_floor(m: MoEFFN, dense: dict, repeats: int) -> dict:
    """The MEO memory-traffic floor (see the module docstring) against dense times in ms."""
    weights = [lin.experts.weight.detach() for lin in (m.fc1, m.fc2)]
    grads = [torch.zeros_like(w) for w in weights]  # written before: no first-touch page faults
    device = weights[0].device

    def read():
        for w in weights:
            w.sum()
        _sync(device)

    def write():
        for g in grads:
            g.fill_(1.0)
        _sync(device)

    r, w = _median_ms(read, repeats), _median_ms(write, repeats)
    nbytes = sum(x.numel() * x.element_size() for x in weights)
    return {
        "experts_mb": nbytes / 2**20,
        "read_ms": r,
        "write_ms": w,
        "fwd": 1 + r / dense["fwd_ms"],
        "fwd_bwd": 1 + (2 * r + w) / dense["fwd_bwd_ms"],
    }


def run_shape(
    batch: int,
    tokens: int,
    dim: int,
    ffn: int,
    experts: int,
    top_k: int,
    repeats: int,
    device,
    dtype,
    variants=VARIANTS,
    memory: bool = True,
    clock: str = "wall",
    impl: str = "auto",
    ops: bool = False,
    compile: bool = False,
) -> dict:
    """Times (and memory, op counts, graph breaks, compiled times when asked) of the variants at one
    shape. ``ops``: op counts and graph breaks under ``res[v]["ops"]``; ``compile``: the variants
    under torch.compile as ``"<variant>:compiled"`` rows."""
    if "dense" not in variants:
        variants = ("dense",) + tuple(variants)
    models = {v: build(v, dim, ffn, experts, top_k, device, dtype, impl=impl) for v in variants}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, dim, generator=g).to(device=device, dtype=dtype)
    probe = torch.randn(batch, tokens, dim, generator=g).to(device)
    timed = dict(models)
    if compile:
        timed.update({f"{v}:compiled": torch.compile(m) for v, m in models.items()})
    times = time_variants(timed, x, repeats, clock=clock)
    res = {v: {"fwd_ms": 1e3 * t["fwd"], "fwd_bwd_ms": 1e3 * t["fwd_bwd"]} for v, t in times.items()}
    if memory:
        for v, m in models.items():
            res[v]["peak_mb"] = peak_memory(m, x, probe) / 2**20
            res[v]["saved_mb"] = saved_bytes(m, x) / 2**20
    for v in res:  # compiled variants against the compiled dense FFN
        d = res["dense:compiled" if v.endswith(":compiled") else "dense"]
        res[v]["ratio"] = {k.rsplit("_", 1)[0]: res[v][k] / d[k] for k in res[v] if k in d and d[k]}
    d = res["dense"]
    if "meo" in models:
        res["meo"]["floor"] = traffic_floor(models["meo"], d, repeats)
    if ops:
        for v, m in models.items():
            res[v]["ops"] = {"run": count_ops(m, x, probe), "reference": count_ops(m, x, probe, "reference")}
            res[v]["ops"].update(graph_breaks(m, x))
    return {"batch": batch, "tokens": tokens, "results": res}


def check_targets(runs: List[dict]) -> List[dict]:
    out = []
    for variant, metric, shape, bound in TARGETS:
        for r in runs:
            if shape is not None and (r["batch"], r["tokens"]) != tuple(shape):
                continue
            res = r["results"].get(variant)
            if res is None or metric not in res["ratio"]:
                continue
            val = res["ratio"][metric]
            t = {
                "variant": variant,
                "metric": metric,
                "shape": [r["batch"], r["tokens"]],
                "ratio": val,
                "bound": bound,
                "met": val <= bound,
            }
            if metric in res.get("floor", {}):
                t["floor"] = res["floor"][metric]
            out.append(t)
    return out


def table(run: dict, meta: dict) -> str:
    res = run["results"]
    has_mem = "peak_mb" in res["dense"]
    lines = [
        f"batch {run['batch']} x {run['tokens']} tokens, impl {meta.get('impl', 'auto')}, "
        f"d={meta['dim']}, ffn={meta['ffn']}, "
        f"{meta['experts']} experts, top-{meta['top_k']}, {meta['dtype']} on {meta['device']}, "
        f"median of {meta['repeats']}, {meta['clock']} clock, {meta['threads']} torch threads"
    ]
    w = max(10, *(len(v) for v in res))
    head = f"{'variant':{w}s} {'fwd ms':>9s} {'x dense':>7s} {'fwd+bwd ms':>11s} {'x dense':>7s}"
    if has_mem:
        head += f" {'peak MB':>9s} {'x dense':>7s} {'saved MB':>9s} {'x dense':>7s}"
    lines += [head, "-" * len(head)]
    for v, r in res.items():
        q = r["ratio"]
        s = f"{v:{w}s} {_ms(r['fwd_ms']):>9s} {q['fwd']:7.2f} {_ms(r['fwd_bwd_ms']):>11s} {q['fwd_bwd']:7.2f}"
        if has_mem and "peak_mb" in r:
            s += f" {r['peak_mb']:9.1f} {q['peak']:7.2f} {r['saved_mb']:9.1f} {q['saved']:7.2f}"
        lines.append(s)
    if any(v.endswith(":compiled") for v in res):
        lines.append("(a compiled variant's ratios are to the compiled dense FFN)")
    if "ops" in res["dense"]:
        d = res["dense"]["ops"]["run"]
        lines.append(
            f"ops per training step (all / non-view; x dense non-view), impl {meta.get('impl', 'auto')} and "
            "reference; graph breaks of the training forward under torch.compile:"
        )
        for v, r in res.items():
            if "ops" not in r:
                continue
            o, ref = r["ops"]["run"], r["ops"]["reference"]
            lines.append(
                f"  {v:10s} {o['all']:5d} / {o['non_view']:4d} ({o['non_view'] / d['non_view']:5.2f}x)"
                "   reference "
                f"{ref['all']:5d} / {ref['non_view']:4d} ({ref['non_view'] / d['non_view']:5.2f}x)   "
                f"graphs {r['ops']['graphs']}, breaks {r['ops']['breaks']}"
            )
    f = res.get("meo", {}).get("floor")
    if f:
        lines.append(
            f"MEO memory-traffic floor: the experts ({f['experts_mb']:.0f} MB) "
            f"read in {_ms(f['read_ms'])} ms, their "
            f"gradients written in {_ms(f['write_ms'])} ms -> fwd >= {f['fwd']:.2f}x, "
            f"fwd+bwd >= {f['fwd_bwd']:.2f}x dense"
        )
    return "\n".join(lines)


def _ms(v: float) -> str:
    """Milliseconds to 0.1 ms, or to three significant digits below 10 ms (GPU timings)."""
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _ints(s: str) -> List[int]:
    return [int(v) for v in str(s).split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.benchmark layers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--batch",
        type=_ints,
        default=None,
        help="comma list, paired with --tokens (default: 16,4 on the CPU, 32,8 on cuda)",
    )
    p.add_argument(
        "--tokens", type=_ints, default=None, help="comma list, paired with --batch (default: 128,512)"
    )
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, which a busy shared machine "
        "does not inflate (use with --threads 1: with more threads it adds up all threads, "
        "spin-waits included)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument(
        "--impl",
        choices=("auto", "reference", "blocked"),
        default="auto",
        help="implementation of the expert layers (MoEConfig.impl / --moe-impl)",
    )
    p.add_argument("--no-ops", action="store_true", help="skip the op counts and graph-break counts")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time every variant under torch.compile (default: on with --device cuda)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shapes = CUDA_SHAPES if torch.device(a.device).type == "cuda" else SHAPES
    if a.batch is None:
        a.batch = [b for b, _ in shapes]
    if a.tokens is None:
        a.tokens = [t for _, t in shapes]
    if a.compile is None:
        a.compile = torch.device(a.device).type == "cuda"
    logging.getLogger("filelock").setLevel(logging.WARNING)  # (inductor's cache locks, at DEBUG)
    if len(a.batch) != len(a.tokens):
        if len(a.batch) == 1:
            a.batch = a.batch * len(a.tokens)
        elif len(a.tokens) == 1:
            a.tokens = a.tokens * len(a.batch)
        else:
            p.error("--batch and --tokens need the same number of values")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype_name = a.dtype or ("bfloat16" if torch.device(a.device).type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    variants = tuple(v for v in a.variants.split(",") if v)
    for v in variants:
        variant_config(v, a.experts, a.top_k)  # validate early
    meta = dict(
        impl=a.impl,
        compile=a.compile,
        dim=a.dim,
        ffn=a.ffn,
        experts=a.experts,
        top_k=a.top_k,
        device=a.device,
        dtype=dtype_name,
        repeats=a.repeats,
        threads=torch.get_num_threads(),
        clock=a.clock,
        torch=torch.__version__,
    )
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = list(os.getloadavg())
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, t in zip(a.batch, a.tokens):
            run = run_shape(
                b,
                t,
                a.dim,
                a.ffn,
                a.experts,
                a.top_k,
                a.repeats,
                a.device,
                dtype,
                variants,
                memory=not a.no_memory,
                clock=a.clock,
                impl=a.impl,
                ops=not a.no_ops,
                compile=a.compile,
            )
            runs.append(run)
            if not a.json:
                print(table(run, meta) + "\n", flush=True)
    targets = check_targets(runs) if (a.dim, a.ffn, a.experts, a.top_k) == (768, 3072, 16, 4) else []
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = list(os.getloadavg())
    if a.json:
        print(json.dumps({**meta, "runs": runs, "targets": targets}, indent=1))
    else:
        if "loadavg_start" in meta:
            print(
                f"load average (1 min) of the machine: {meta['loadavg_start'][0]:.2f} at the start, "
                f"{meta['loadavg_end'][0]:.2f} at the end ({os.cpu_count()} CPUs)"
            )
    if targets and not a.json:
        print("targets (ratio to dense, same run):")
        for t in targets:
            floor = f", traffic floor {t['floor']:.2f}x" if "floor" in t else ""
            print(
                f"  {t['variant']:9s} {t['metric']:7s} at {t['shape'][0]}x{t['shape'][1]}: {t['ratio']:.2f}x "
                f"(goal <= {t['bound']}x{floor}) {'met' if t['met'] else 'NOT met'}"
            )
    return 0
