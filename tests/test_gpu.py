"""The GPU path: CUDA results against the CPU, half precision against fp32, and fairseq training
with --bf16 / --fp16 followed by generation and evaluation on the GPU.

Skipped without CUDA (CI has none). On a GPU machine: ``pytest tests/test_gpu.py``.
"""

import math

import pytest
import torch
from cli_utils import (
    ADAM,
    LM_COMMON,
    MOE_SMALL,
    REPO,
    USER_DIR,
    eval_lm,
    finite,
    gpu_args,
    hypotheses,
    preprocess_lm,
    preprocess_seq2seq,
    run,
    train_inner,
    write_seq2seq_text,
)
from test_cli_translation import COMMON, MODELS

import meo_fairseq.modules.merge as M
from meo_fairseq.benchmark.layers import build
from meo_fairseq.modules import MoEConfig, Router
from meo_fairseq.modules.merge import merged_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = "cuda"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (Frobenius norms, in fp64 on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons against the CPU need full fp32 matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _merged_linear_run(device, x, gates, w, b, dy):
    x, gates, w, b = (t.detach().to(device).requires_grad_(True) for t in (x, gates, w, b))
    y = merged_linear(x, gates, w, b)
    y.backward(dy.to(device))
    return [y, x.grad, gates.grad, w.grad, b.grad]


@pytest.mark.parametrize(
    "groups,tokens,in_f,out_f,cuda_block",
    [(3, 5, 32, 48, None), (40, 6, 256, 512, None), (40, 6, 256, 512, 2**20)],
)
def test_merged_linear_cuda_equals_cpu(monkeypatch, groups, tokens, in_f, out_f, cuda_block):
    """Both paths of MergedLinearFunction on the GPU (short, and blocked with a small
    MERGE_BLOCK_BYTES_CUDA) against the CPU: values and all four gradients."""
    if cuda_block is not None:
        monkeypatch.setattr(M, "MERGE_BLOCK_BYTES_CUDA", cuda_block)
    n = 6
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(groups, tokens, in_f, generator=g)
    w = torch.randn(n, out_f, in_f, generator=g) * in_f**-0.5
    b = torch.randn(n, out_f, generator=g)
    gates = torch.rand(groups, n, generator=g) * (torch.rand(groups, n, generator=g) > 0.4)
    dy = torch.randn(groups, tokens, out_f, generator=g)
    assert M._whole(x.to(CUDA), w.to(CUDA)) == (cuda_block is None)
    assert len(M._row_blocks(groups, w.to(CUDA))) == (1 if cuda_block is None else 4)
    cpu = _merged_linear_run("cpu", x, gates, w, b, dy)
    gpu = _merged_linear_run(CUDA, x, gates, w, b, dy)
    for name, c, d in zip(("y", "dx", "dgates", "dw", "db"), cpu, gpu):
        assert d.device.type == "cuda"
        assert _rel(d, c) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 3, 7, 13])
@pytest.mark.parametrize("path", ["short", "blocked", "chunked"])
def test_merged_linear_half_precision_any_group_count(monkeypatch, dtype, groups, path):
    """Half precision on the GPU at the tiny models' sizes, for odd numbers of groups (a fairseq
    batch of 7 sentences), on the short path, the blocked path and with several chunks of groups:
    against fp32 on the CPU. The short path once wrote the gate gradient through a transposed
    half-precision output, which cuBLASLt refused (CUBLAS_STATUS_INVALID_VALUE) for one group, in
    bf16 and in fp16 (the 2 cases of this test that failed before the fix)."""
    n, in_f, out_f, tokens = 8, 64, 256, 9
    if path != "short":
        monkeypatch.setattr(M, "MERGE_BLOCK_BYTES_CUDA", groups * 64 * in_f * 2)  # MERGE_MIN_ROWS-row blocks
    if path == "chunked":
        monkeypatch.setattr(M, "MERGE_CHUNK_BYTES", 2 * out_f * in_f * 2)  # 2 groups a chunk (the last 1)
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(groups, tokens, in_f, generator=g)
    w = torch.randn(n, out_f, in_f, generator=g) * in_f**-0.5
    b = torch.randn(n, out_f, generator=g) * 0.1
    top = torch.randn(groups, n, generator=g).topk(2, 1)
    gates = torch.zeros(groups, n).scatter_(1, top.indices, torch.softmax(top.values, 1))
    dy = torch.randn(groups, tokens, out_f, generator=g)

    def half(t):
        return t.to(dtype)

    assert M._whole(half(x).to(CUDA), half(w).to(CUDA)) == (path == "short")
    cpu = _merged_linear_run("cpu", x, gates, w, b, dy)
    gpu = _merged_linear_run(CUDA, half(x), gates, half(w), half(b), half(dy))
    for name, c, d in zip(("y", "dx", "dgates", "dw", "db"), cpu, gpu):
        assert d.device.type == "cuda" and torch.isfinite(d).all(), name
        assert _rel(d, c) < 2e-2, name


VARIANTS = ["moe-token", "moe-seq", "meo", "meo-token"]


def _step(m, x, probe):
    """Eval-mode forward and backward (no gate noise, no auxiliary loss); y, dx and the gradients
    of every parameter."""
    m.eval()
    for p in m.parameters():
        p.grad = None
    xi = x.detach().requires_grad_(True)
    y = m(xi)
    (y.float() * probe).sum().backward()
    return y, xi.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["reference", "blocked"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expert_ffn_on_cuda_matches_fp32_cpu(variant, dtype, impl):
    """Every expert layer on the GPU (both implementations), fp32 and half precision, against the
    blocked fp32 path on the CPU: same experts selected (identical outputs up to rounding), same
    gradients."""
    dim, ffn, experts, k = 64, 256, 8, 2
    ref = build(variant, dim, ffn, experts, k, "cpu", torch.float32, seed=5, impl="blocked")
    gpu = build(variant, dim, ffn, experts, k, CUDA, dtype, seed=5, impl=impl)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, dim, generator=g)
    probe = torch.randn(6, 40, dim, generator=g)
    y0, dx0, gr0 = _step(ref, x, probe)
    y1, dx1, gr1 = _step(gpu, x.to(CUDA, dtype), probe.to(CUDA))
    assert y1.dtype == dtype and y1.device.type == "cuda"
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    if variant == "moe-token" and dtype != torch.float32:
        # per-token routing in half precision: the few tokens whose top-k scores nearly tie pick
        # another expert after rounding (legitimately); every other token must agree
        rel = ((y1.double().cpu() - y0.double()).norm(dim=-1) / y0.double().norm(dim=-1)).flatten()
        assert (rel < tol).float().mean() > 0.9 and rel.median() < tol / 3
        return
    assert _rel(y1, y0) < tol
    assert _rel(dx1, dx0) < tol
    assert gr0.keys() == gr1.keys() and any("experts" in n for n in gr0)
    for n in gr0:
        assert _rel(gr1[n], gr0[n]) < (tol if "experts" in n else 10 * tol), n


@pytest.mark.parametrize("balance", ["cv", "none"])
def test_fused_gating_on_cuda_equals_reference(balance):
    """The fused training gate (modules/gating.py) against the step-by-step router, on the GPU."""
    cfg = MoEConfig(
        mode="meo",
        level="sequence",
        routing="sequence",
        experts=8,
        top_k=2,
        balance_loss=balance,
        z_loss_weight=1e-2,
        gate_noise=True,
        balance_weight=0.1,
        impl="blocked",
    )
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)).to(CUDA)
    mask = torch.tensor([True, False, True] * 4, device=CUDA)
    outs = []
    for fused in (False, True):
        torch.manual_seed(3)
        r = Router(16, cfg).to(CUDA)
        with torch.no_grad():
            r.w_gate.normal_()
            r.w_noise.normal_(std=0.5)
        r.train()
        r.fused = fused
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(4)  # the same noise draw in both paths
        gates, idx, w, _ = r.route(xi, mask)
        torch.manual_seed(7)
        gg, gw = torch.randn_like(gates), torch.randn_like(w)
        ((gates * gg).sum() + (w * gw).sum() + 3.0 * r.aux_loss).backward()
        outs.append([gates, idx, w, r.aux_loss, xi.grad, r.w_gate.grad, r.w_noise.grad])
    assert torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["meo", "meo-token", "moe-token"])
def test_compiled_reference_path_on_cuda_equals_eager(variant):
    """torch.compile(fullgraph=True) of a bf16 training step on the GPU (grouped_mm for the
    token-level MoE), against eager, with inductor drawing the gate noise as eager does."""
    import torch._inductor.config as inductor_config

    m = build(variant, 64, 256, 8, 2, CUDA, torch.bfloat16, seed=5, impl="reference").train()
    x = torch.randn(4, 32, 64, device=CUDA, dtype=torch.bfloat16)

    def loss_fn(inp):
        y = m(inp)
        return y.float().square().sum() + sum(r.aux_loss for r in m.routers())

    def step(fn):
        for p in m.parameters():
            p.grad = None
        torch.manual_seed(4)
        xi = x.clone().requires_grad_(True)
        loss = fn(xi)
        loss.backward()
        return [loss, xi.grad] + [p.grad for p in m.parameters() if p.grad is not None]

    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        torch._dynamo.reset()
        compiled = step(torch.compile(loss_fn, fullgraph=True))
    finally:
        inductor_config.fallback_random = old
    eager = step(loss_fn)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 3e-2


# ---- fairseq on the GPU --------------------------------------------------------------------

UPDATES = 12


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_fairseq_lm_half_precision_on_gpu(tmp_path, precision):
    """MEO LM trained with fairseq's mixed precision on the GPU; the checkpoint evaluates on the
    GPU and on the CPU to the same loss."""
    data = preprocess_lm(tmp_path / "bin")
    args = [
        data,
        "--user-dir",
        USER_DIR,
        "--arch",
        "meo_transformer_lm_tiny",
        "--criterion",
        "moe_cross_entropy",
    ]
    args += [*gpu_args(LM_COMMON), precision, *ADAM, "--max-update", UPDATES]
    args += ["--moe-mode", "meo", *MOE_SMALL, "--moe-segment-length", "16", "--save-dir", tmp_path / "ckpt"]
    # fairseq-train takes --bf16 for --tpu: bfloat16 trains through meo_fairseq.train
    rows = train_inner(run("meo_fairseq.train" if precision == "--bf16" else "train", args, cwd=REPO).log)
    assert rows[-1]["num_updates"] == UPDATES and all(finite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    ev = [
        eval_lm(
            run(
                "eval_lm",
                [
                    data,
                    "--user-dir",
                    USER_DIR,
                    "--path",
                    tmp_path / "ckpt" / "checkpoint_last.pt",
                    "--gen-subset",
                    "test",
                    "--tokens-per-sample",
                    "64",
                    "--max-tokens",
                    "2048",
                    "--num-workers",
                    "0",
                    *dev,
                ],
            ).log
        )
        for dev in ([], ["--cpu"])
    ]
    assert ev[0].tokens == ev[1].tokens > 1000
    assert math.isfinite(ev[0].loss) and abs(ev[0].loss - ev[1].loss) < 1e-3


def test_fairseq_translation_fp16_generate_on_gpu(tmp_path):
    """Encoder-decoder MEO trained with --fp16, then beam search on the GPU (with --fp16) and on
    the CPU: a hypothesis for every input, the same ones."""
    write_seq2seq_text(tmp_path / "text")
    data = preprocess_seq2seq(tmp_path / "text", tmp_path / "bin")
    args = [data, *MODELS["meo"], *gpu_args(COMMON), "--fp16", *ADAM, "--max-update", UPDATES]
    args += ["--save-dir", tmp_path / "ckpt"]
    rows = train_inner(run("train", args).log)
    assert rows[-1]["num_updates"] == UPDATES and all(finite(r["loss"]) for r in rows)
    gen = [
        "--user-dir",
        USER_DIR,
        "--path",
        tmp_path / "ckpt" / "checkpoint_last.pt",
        "--gen-subset",
        "valid",
        "--beam",
        "4",
        "--batch-size",
        "32",
        "--required-batch-size-multiple",
        "1",
        "--max-len-a",
        "0",
        "--max-len-b",
        "20",
    ]
    on_gpu = hypotheses(run("generate", [data, *gen]).log)
    on_gpu16 = hypotheses(run("generate", [data, *gen, "--fp16"]).log)
    on_cpu = hypotheses(run("generate", [data, *gen, "--cpu"]).log)
    assert len(on_gpu) == len(on_cpu) == len(on_gpu16) == 20
    assert sum(on_gpu[i][1] == on_cpu[i][1] for i in on_cpu) >= 18  # fp32 on both: ties aside, the same
    assert all(len(h[1].split()) > 0 for h in on_gpu16.values())
