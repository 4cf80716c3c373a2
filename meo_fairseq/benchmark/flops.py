"""FLOPs of a BERT-like masked LM whose FFNs are the plugin's :class:`MoEFFN` layers.

What is counted
---------------
The model is built from plain torch modules (embeddings, self-attention written out with
matmuls, LayerNorm, the masked-LM head with its vocabulary projection) and, in every layer, a
real :class:`meo_fairseq.modules.MoEFFN` with experts in every FFN linear (expert unit
``linear``, the authors' layout). One sequence of ``--seq-len`` tokens runs forward (eval mode)
under ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products only, at
2 FLOPs per multiply-add; LayerNorm, softmax, activations, biases and the gate arithmetic are not
counted (the usual convention, and the paper's).

* ``dense``: ``MoEConfig(mode="dense")``: the plain BERT FFN.
* ``moe`` (vanilla MoE): token-level top-k routing, every token runs its k experts
  (``mode="moe", level="token"``); the routers' products are included.
* ``meo``: sequence-level routing, one merged expert per sequence (``mode="meo"``, forced onto
  the merge path with ``merge_min_tokens=0``: for k=1 the layer's cost model would otherwise run
  the single expert directly, which is cheaper still).

The merge, counted once and in two conventions
----------------------------------------------
``merged_linear`` (merge + one matmul per sequence) is wrapped while counting. Inside a call the
counter sees the matmul with the merged weights (2 x T x out x in per sequence) and whatever
products the merge itself runs: the ``[G, N] x [N, out*in]`` product over all N experts (zeros for
the unselected ones) for several sequences, nothing for a single sequence on the CPU, where
merge.py accumulates only the selected experts elementwise, which the counter does not see
(``merge_gflops.seen_by_counter``). The wrapper measures what the counter saw inside the call,
subtracts that from the total, and adds the merge back explicitly, so that it is counted exactly
once, in one of two conventions:

* ``as_run`` (``merge_gflops.dense_product``): the merge as the ``[G, N] x [N, out*in]`` product
  (plus the bias product), 2 x N x (out*in + out) FLOPs per sequence and linear: what the merge
  costs in a FLOP counter when it runs as one product, zeros included.
* ``paper`` (``merge_gflops.paper``, used for ``meo`` and the reproduction check): only the k
  selected experts, **k x P FLOPs per sequence**, P = out*in + out the parameters of the linear:
  one FLOP per selected weight element (a gate-weighted accumulate counted once). This is the
  paper's "MEO adds about k x P_ffn for the merge": BERT-base, 128 tokens, top-4 of 16 gives
  28.73G against the paper's 28.6G (+0.4%); counting the merge at 2 FLOPs per multiply-add
  (``merge_gflops.paper_x2``) would give 28.95G (+1.2%), the dense product over N 30.31G (+6%).

With these, BERT-base (12 x 768/3072, 12 heads, vocabulary 30,522, 128 tokens, 16 experts, top-4)
gives dense 28.50G, vanilla MoE 72.33G (paper 72.0G, +0.45%; 0.19G of it are the token routers
and 0.15G the gated biases of fc1, which the dispatch adds for all tokens as one ``[T, N] x
[N, ff]`` product), MEO 28.73G (paper 28.6G). By hand: dense = 12 x (2T(4d^2 + 2 d ff) + 4 T^2 d) +
2T(d^2 + d V); vanilla MoE adds (k-1) x 2 x T x P_ffn per layer plus its routers and that product;
MEO adds k x P_ffn per layer (see :func:`formula`).

Sweep
-----
``--sweep`` counts k in {1, 2, 4, 8, 16, 32} with 32 experts (so that every k is a valid top-k
of the same expert pool; the FLOPs of ``moe`` and of ``meo`` in the paper convention do not depend
on N except through the tiny router) for BERT-small (4 x 512/2048, 8 heads), BERT-base and
BERT-large (24 x 1024/4096, 16 heads) and draws FLOPs against k (the paper's figure) to ``--out``.

Weights
-------
FLOPs do not depend on weight values, so models are built on the meta device and materialised
with every expert of a linear sharing one random matrix (an expanded view): a BERT-large with 32
experts per linear would otherwise need 26 GB. The modules, routing and code paths are the real
ones.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..modules import MoEConfig, MoEFFN, StackedExperts
from ..modules import layer as layer_mod
from ..modules import merge as merge_mod

PRESETS: Dict[str, dict] = {
    "bert-small": dict(layers=4, dim=512, ffn=2048, heads=8),
    "bert-base": dict(layers=12, dim=768, ffn=3072, heads=12),
    "bert-large": dict(layers=24, dim=1024, ffn=4096, heads=16),
}
BERT_VOCAB = 30522
# The paper's numbers (BERT-base, 128 tokens, top-4 of 16 experts), GFLOPs.
PAPER = {"dense": 28.5, "moe": 72.0, "meo": 28.6}
TOLERANCE = 0.02
SWEEP_K = (1, 2, 4, 8, 16, 32)
SWEEP_EXPERTS = 32
MODES = ("dense", "moe", "meo")


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


def layer_config(mode: str, experts: int, top_k: int) -> MoEConfig:
    """The MoEConfig of every FFN for one of MODES (see the module docstring)."""
    if mode == "dense":
        return MoEConfig(mode="dense")
    if mode == "moe":
        return MoEConfig(
            mode="moe", level="token", routing="token", experts=experts, top_k=top_k, expert_unit="linear"
        )
    if mode == "meo":
        return MoEConfig(
            mode="meo",
            level="sequence",
            routing="sequence",
            experts=experts,
            top_k=top_k,
            expert_unit="linear",
            merge_min_tokens=0.0,
        )
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


class BertLayer(nn.Module):
    """Post-LN BERT encoder layer; the FFN is a MoEFFN (GELU)."""

    def __init__(self, dim: int, ffn: int, heads: int, cfg: MoEConfig):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = MoEFFN(dim, ffn, cfg, activation_fn=F.gelu)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x, pad_mask=None):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(z):
            return z.view(b, t, h, dh).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
        if pad_mask is not None:
            scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        ctx = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + self.attn_out(ctx))
        return self.ln2(x + self.ffn(x, pad_mask))


class BertMLM(nn.Module):
    """BERT encoder + masked-LM head (dense + GELU + LayerNorm + vocabulary projection, tied)."""

    def __init__(
        self,
        layers: int,
        dim: int,
        ffn: int,
        heads: int,
        vocab: int,
        cfg: MoEConfig,
        max_positions: int = 512,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.typ = nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(BertLayer(dim, ffn, heads, cfg) for _ in range(layers))
        self.head_dense = nn.Linear(dim, dim)
        self.head_ln = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.tok.weight

    def forward(self, tokens, pad_mask=None):
        pos = torch.arange(tokens.size(1), device=tokens.device)
        x = self.ln(self.tok(tokens) + self.pos(pos) + self.typ(torch.zeros_like(tokens)))
        for layer in self.layers:
            x = layer(x, pad_mask)
        return self.decoder(self.head_ln(F.gelu(self.head_dense(x))))


@torch.no_grad()
def materialize_(model: nn.Module, seed: int = 0, device="cpu") -> nn.Module:
    """Give a meta-device model real parameters; the experts of a linear share one matrix."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 20, generator=gen)  # values are tiled from here: randn of 10^8 is slow

    def rand(*shape, std=0.02):
        numel = math.prod(shape)
        off = int(torch.randint(len(pool), (1,), generator=gen))
        reps = -(-(off + numel) // len(pool))
        flat = (pool.repeat(reps) if reps > 1 else pool)[off : off + numel]
        return (flat * std).view(shape).to(device)

    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if isinstance(mod, StackedExperts) and name == "weight":
                n, out_f, in_f = p.shape
                t = rand(out_f, in_f, std=in_f**-0.5).unsqueeze(0).expand(n, out_f, in_f)
            elif isinstance(mod, nn.LayerNorm):
                t = (
                    torch.ones(p.shape, device=device)
                    if name == "weight"
                    else torch.zeros(p.shape, device=device)
                )
            elif isinstance(mod, StackedExperts) and name == "scales":
                t = torch.ones(p.shape, device=device)
            else:
                t = rand(*p.shape)
            setattr(mod, name, nn.Parameter(t, requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_meta:
                setattr(mod, name, torch.zeros(b.shape, dtype=b.dtype, device=device))
    if isinstance(model, BertMLM):
        model.decoder.weight = model.tok.weight
    return model


def build_bert(
    mode: str,
    layers: int,
    dim: int,
    ffn: int,
    heads: int,
    vocab: int = BERT_VOCAB,
    experts: int = 16,
    top_k: int = 4,
    seq_len: int = 128,
    seed: int = 0,
) -> BertMLM:
    cfg = layer_config(mode, experts, top_k)
    with torch.device("meta"):
        model = BertMLM(layers, dim, ffn, heads, vocab, cfg, max_positions=max(512, seq_len))
    return materialize_(model, seed).eval()


# ------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    """FLOPs of one forward. ``counter``: FlopCounterMode's total (the merge included as far as the
    counter sees it); the ``merge_*`` fields add up over every merged_linear call."""

    counter: int = 0
    merge_seen: int = 0
    merge_dense_product: int = 0
    merge_paper: int = 0
    merges: int = 0  # merged_linear calls
    by_module: Dict[str, int] = field(default_factory=dict)

    @property
    def compute(self) -> int:
        """Everything but the merge."""
        return self.counter - self.merge_seen

    @property
    def as_run(self) -> int:
        return self.compute + self.merge_dense_product

    @property
    def paper(self) -> int:
        return self.compute + self.merge_paper


@contextlib.contextmanager
def _count_merges(counter: FlopCounterMode, result: FlopCount):
    """Wrap merged_linear (where layer.py looks it up) to account for the merge explicitly."""
    originals = [(mod, mod.merged_linear) for mod in (layer_mod, merge_mod) if hasattr(mod, "merged_linear")]
    original = merge_mod.merged_linear

    def probe(x, gates, weight, bias=None, grad_buffer=None):
        before = counter.get_total_flops()
        y = original(x, gates, weight, bias, grad_buffer)
        seen = counter.get_total_flops() - before
        g, t, _ = x.shape
        n, out_f, in_f = weight.shape
        params = out_f * in_f + (out_f if bias is not None else 0)
        apply = 2 * g * t * out_f * in_f  # the matmul with the merged weights
        result.merge_seen += seen - apply
        result.merge_dense_product += 2 * g * n * params
        result.merge_paper += int((gates != 0).sum()) * params
        result.merges += 1
        return y

    for mod, _ in originals:
        mod.merged_linear = probe
    try:
        yield
    finally:
        for mod, fn in originals:
            mod.merged_linear = fn


def count_flops(model: nn.Module, *inputs, **kwargs) -> FlopCount:
    """Count one forward of ``model(*inputs, **kwargs)`` (no grad)."""
    result = FlopCount()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, _count_merges(counter, result):
        model(*inputs, **kwargs)
    result.counter = counter.get_total_flops()
    result.by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return result


def formula(
    layers: int, dim: int, ffn: int, heads: int, vocab: int, seq_len: int, experts: int, top_k: int
) -> Dict[str, int]:
    """Hand count (FLOPs = 2 x multiply-adds; merge in the paper convention), one sequence."""
    t, d, f, n, k = seq_len, dim, ffn, experts, top_k
    attn = 2 * t * 4 * d * d + 2 * 2 * t * t * d  # q, k, v, out projections; QK^T and AV
    ffn_dense = 2 * t * 2 * d * f
    head = 2 * t * d * d + 2 * t * d * vocab
    p_ffn = 2 * d * f + d + f  # fc1 + fc2 weights and biases
    dense = layers * (attn + ffn_dense) + head
    # k experts per token + token routers + fc1's gated biases as one [T, N] x [N, ff] product
    # (dispatch.py adds the biases of a widening linear that way; biases are otherwise not counted)
    moe = dense + layers * ((k - 1) * ffn_dense + 2 * t * (d + f) * n + 2 * t * n * f)
    meo_compute = dense + layers * 2 * (d + f) * n  # one merged expert + one router call per sequence
    return {
        "dense": dense,
        "moe": moe,
        "meo": meo_compute + layers * k * p_ffn,
        "meo_as_run": meo_compute + layers * 2 * n * p_ffn,
    }


def measure(
    preset: Optional[str] = None, seq_len: int = 128, experts: int = 16, top_k: int = 4, **dims
) -> dict:
    """FLOPs of dense / vanilla MoE / MEO for one model size, as a JSON-able dict (GFLOPs)."""
    spec = dict(PRESETS[preset]) if preset else {}
    spec.update({k: v for k, v in dims.items() if v is not None})
    spec.setdefault("vocab", BERT_VOCAB)
    missing = [k for k in ("layers", "dim", "ffn", "heads") if k not in spec]
    if missing:
        raise ValueError(
            f"give --preset or all of --layers --dim --ffn --heads (missing {', '.join(missing)})"
        )
    tokens = torch.randint(spec["vocab"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    counts = {}
    for mode in MODES:
        model = build_bert(mode, experts=experts, top_k=top_k, seq_len=seq_len, **spec)
        counts[mode] = count_flops(model, tokens)
        del model
    meo = counts["meo"]
    if meo.merges != 2 * spec["layers"]:
        raise RuntimeError(
            f"expected {2 * spec['layers']} merged_linear calls, saw {meo.merges}: "
            "is the merge path still merged_linear?"
        )
    G = 1e9
    out = {
        "preset": preset,
        **spec,
        "seq_len": seq_len,
        "experts": experts,
        "top_k": top_k,
        "gflops": {
            "dense": counts["dense"].counter / G,
            "moe": counts["moe"].counter / G,
            "meo": meo.paper / G,
            "meo_as_run": meo.as_run / G,
        },
        "merge_gflops": {
            "paper": meo.merge_paper / G,
            "paper_x2": 2 * meo.merge_paper / G,
            "dense_product": meo.merge_dense_product / G,
            "seen_by_counter": meo.merge_seen / G,
        },
        "formula_gflops": {
            k: v / G for k, v in formula(seq_len=seq_len, experts=experts, top_k=top_k, **spec).items()
        },
        "convention": "FLOPs = 2 x multiply-adds of matrix products; meo: merge = k x P per sequence "
        "and linear (paper); meo_as_run: merge = the [G,N]x[N,out*in] product, 2 x N x P",
    }
    if (
        preset == "bert-base"
        and seq_len == 128
        and experts == 16
        and top_k == 4
        and spec["vocab"] == BERT_VOCAB
    ):
        err = {k: out["gflops"][k] / PAPER[k] - 1 for k in PAPER}
        out["paper_gflops"] = dict(PAPER)
        out["rel_err"] = err
        out["reproduced"] = all(abs(e) <= TOLERANCE for e in err.values())
    return out


# ------------------------------------------------------------------------------------------
# Sweep and figure
# ------------------------------------------------------------------------------------------


def sweep(
    presets=tuple(PRESETS), ks=SWEEP_K, experts: int = SWEEP_EXPERTS, seq_len: int = 128, log=None
) -> List[dict]:
    rows = []
    for preset in presets:
        for k in ks:
            t0 = time.perf_counter()
            r = measure(preset, seq_len=seq_len, experts=experts, top_k=k)
            rows.append({"preset": preset, "top_k": k, "experts": experts, "seq_len": seq_len, **r["gflops"]})
            if log:
                log(
                    f"{preset:10s} k={k:2d}: dense {r['gflops']['dense']:8.2f}G  "
                    f"moe {r['gflops']['moe']:8.2f}G  "
                    f"meo {r['gflops']['meo']:8.2f}G  ({time.perf_counter() - t0:.1f}s)"
                )
    return rows


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, preset in enumerate(presets):
        rs = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["top_k"])
        ks = [r["top_k"] for r in rs]
        c = colors[i % len(colors)]
        ax.plot(ks, [r["moe"] for r in rs], "o-", color=c, label=f"{preset} vanilla MoE")
        ax.plot(ks, [r["meo"] for r in rs], "s--", color=c, label=f"{preset} MEO")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ks = sorted({r["top_k"] for r in rows})
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("selected experts k")
    ax.set_ylabel("GFLOPs per sequence")
    r0 = rows[0]
    ax.set_title(
        f"FLOPs vs k ({r0['seq_len']} tokens, {r0['experts']} experts, experts in every FFN linear)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.benchmark flops",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="bert-base")
    p.add_argument("--layers", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int, default=BERT_VOCAB)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f"k in {list(SWEEP_K)}, {SWEEP_EXPERTS} experts, all presets; writes --out",
    )
    p.add_argument("--sweep-k", type=_ints, default=list(SWEEP_K))
    p.add_argument("--sweep-experts", type=int, default=SWEEP_EXPERTS)
    p.add_argument("--sweep-presets", default=",".join(PRESETS))
    p.add_argument(
        "--out",
        default="flops_vs_k.png",
        help="figure path for --sweep (a .json with the numbers goes beside it)",
    )
    a = p.parse_args(argv)
    for flag in ("layers", "dim", "ffn", "heads", "vocab", "seq_len", "experts", "top_k", "sweep_experts"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if a.top_k > a.experts:
        p.error(f"--top-k {a.top_k} must not exceed --experts {a.experts}")
    if a.dim is not None and a.heads is not None and a.dim % a.heads:
        p.error(f"--dim {a.dim} must be a multiple of --heads {a.heads}")
    if a.sweep and (not a.sweep_k or min(a.sweep_k) < 1 or max(a.sweep_k) > a.sweep_experts):
        p.error(f"--sweep-k values must be in 1..--sweep-experts ({a.sweep_experts}), got {a.sweep_k}")

    if a.sweep:
        log = None if a.json else (lambda s: print(s, file=sys.stderr, flush=True))
        presets = [s for s in a.sweep_presets.split(",") if s]
        rows = sweep(presets, a.sweep_k, a.sweep_experts, a.seq_len, log=log)
        plot(rows, a.out)
        side = a.out.rsplit(".", 1)[0] + ".json"
        with open(side, "w") as f:
            json.dump(rows, f, indent=1)
        if a.json:
            print(json.dumps({"figure": a.out, "rows": rows}, indent=1))
        else:
            print(
                f"{'preset':10s} {'k':>3s} {'dense':>9s} {'moe':>9s} {'meo':>9s} "
                f"{'meo_as_run':>10s}  (GFLOPs)"
            )
            for r in rows:
                print(
                    f"{r['preset']:10s} {r['top_k']:3d} {r['dense']:9.2f} {r['moe']:9.2f} {r['meo']:9.2f} "
                    f"{r['meo_as_run']:10.2f}"
                )
            print(f"figure: {a.out}\nnumbers: {side}")
        return 0

    preset = a.preset if all(v is None for v in (a.layers, a.dim, a.ffn, a.heads)) else None
    base = dict(PRESETS[a.preset]) if preset is None else {}
    dims = {
        k: getattr(a, k) if getattr(a, k) is not None else base.get(k)
        for k in ("layers", "dim", "ffn", "heads")
    }
    r = measure(
        preset, seq_len=a.seq_len, experts=a.experts, top_k=a.top_k, vocab=a.vocab, **({} if preset else dims)
    )
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    gf, mg = r["gflops"], r["merge_gflops"]
    name = preset or "custom"
    print(
        f"{name}: {r['layers']} layers, d={r['dim']}, ffn={r['ffn']}, {r['heads']} heads, "
        f"vocab {r['vocab']}, "
        f"{r['seq_len']} tokens, top-{r['top_k']} of {r['experts']} experts in every FFN linear"
    )
    print(f"  dense                {gf['dense']:9.2f} GFLOPs")
    print(f"  vanilla MoE (token)  {gf['moe']:9.2f} GFLOPs  ({gf['moe'] / gf['dense']:.2f}x dense)")
    print(
        f"  MEO (paper conv.)    {gf['meo']:9.2f} GFLOPs  ({gf['meo'] / gf['dense']:.3f}x dense; "
        f"merge k x P = {mg['paper']:.3f}G)"
    )
    print(
        f"  MEO (as run)         {gf['meo_as_run']:9.2f} GFLOPs  "
        f"(merge as the [G,N]x[N,out*in] product = {mg['dense_product']:.3f}G;"
        f" the counter saw {mg['seen_by_counter']:.3f}G of merge)"
    )
    if "rel_err" in r:
        e = r["rel_err"]
        print(
            f"  paper: dense {PAPER['dense']}G, MoE {PAPER['moe']}G, MEO {PAPER['meo']}G -> relative error "
            f"dense {e['dense']:+.2%}, MoE {e['moe']:+.2%}, MEO {e['meo']:+.2%}: "
            f"{'reproduced' if r['reproduced'] else 'NOT reproduced'} (tolerance {TOLERANCE:.0%})"
        )
    return 0
