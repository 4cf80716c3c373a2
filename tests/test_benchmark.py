"""meo_fairseq.benchmark: FLOP counts against hand counts and the paper, the memory measures on
tiny layers, the log parsers of the fairseq benchmark. No assertion is about a timing."""

import json
import warnings

import pytest
import torch

from meo_fairseq.benchmark import flops as FL
from meo_fairseq.benchmark import layers as LY
from meo_fairseq.benchmark import model as MD
from meo_fairseq.benchmark.__main__ import main as bench_main
from meo_fairseq.modules import ExpertLinear, MoEFFN, Router
from meo_fairseq.modules.buffers import scratch_bytes

B, T, DIN, DOUT, N, K = 2, 5, 8, 6, 4, 2


def randomize_routers_(m):
    with torch.no_grad():
        for r in m.modules():
            if isinstance(r, Router):
                r.w_gate.normal_()
    return m.eval()


def cfg(mode):
    return FL.layer_config(mode, N, K)


# ---- FLOPs: single layers, by hand -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(DIN, DOUT), (DOUT, DIN)])  # (in, out): narrowing, widening
@pytest.mark.parametrize("bias", [True, False])
def test_expert_linear_flops_by_hand(bias, shape):
    torch.manual_seed(0)
    DIN, DOUT = shape  # noqa: N806
    x = torch.randn(B, T, DIN)
    dense = FL.count_flops(ExpertLinear(DIN, DOUT, cfg("dense"), bias=bias).eval(), x)
    moe = FL.count_flops(randomize_routers_(ExpertLinear(DIN, DOUT, cfg("moe"), bias=bias)), x)
    meo = FL.count_flops(randomize_routers_(ExpertLinear(DIN, DOUT, cfg("meo"), bias=bias)), x)
    p = DOUT * DIN + (DOUT if bias else 0)  # parameters of one expert

    assert dense.counter == 2 * B * T * DOUT * DIN
    assert dense.merges == 0 and dense.merge_seen == 0
    # vanilla MoE: every token runs K experts; the token router is a [BT, DIN] x [DIN, N] product;
    # a widening linear adds its gated biases as one [BT, N] x [N, DOUT] product (dispatch.py)
    mix_bias = 2 * B * T * N * DOUT if (bias and DOUT > DIN) else 0
    assert moe.counter == K * 2 * B * T * DOUT * DIN + 2 * B * T * DIN * N + mix_bias
    assert moe.merges == 0
    # MEO: one merge per sequence, then one matmul per token; the router runs once per sequence
    assert meo.merges == 1
    assert meo.compute == 2 * B * T * DOUT * DIN + 2 * B * DIN * N
    assert meo.merge_paper == B * K * p  # k x P per sequence (paper convention)
    assert meo.merge_dense_product == 2 * B * N * p  # the [G, N] x [N, out*in] product
    assert meo.paper == meo.compute + B * K * p
    assert meo.as_run == meo.compute + 2 * B * N * p
    # counted once: what the counter saw is exactly compute + the merge it saw
    assert meo.counter == meo.compute + meo.merge_seen
    assert 0 <= meo.merge_seen <= meo.merge_dense_product


def test_moeffn_flops_by_hand():
    d, f = 8, 12
    x = torch.randn(B, T, d)
    dense = FL.count_flops(MoEFFN(d, f, cfg("dense")).eval(), x)
    moe = FL.count_flops(randomize_routers_(MoEFFN(d, f, cfg("moe"))), x)
    meo = FL.count_flops(randomize_routers_(MoEFFN(d, f, cfg("meo"))), x)
    ffn = 2 * B * T * 2 * d * f
    p_ffn = 2 * d * f + d + f
    assert dense.counter == ffn
    # routers, and fc1 (widening) adds its gated biases as one [BT, N] x [N, f] product
    assert moe.counter == K * ffn + 2 * B * T * (d + f) * N + 2 * B * T * N * f
    assert meo.merges == 2
    assert meo.compute == ffn + 2 * B * (d + f) * N
    assert meo.merge_paper == B * K * p_ffn
    assert meo.merge_dense_product == 2 * B * N * p_ffn


def test_meo_flops_do_not_depend_on_the_merge_path_choice():
    """The benchmark forces MEO onto the merge path (for k=1 the cost model would mix)."""
    c = FL.layer_config("meo", 32, 1)
    assert c.merge_min_tokens == 0.0
    x = torch.randn(1, 16, DIN)
    meo = FL.count_flops(randomize_routers_(ExpertLinear(DIN, DOUT, c)), x)
    assert meo.merges == 1 and meo.merge_paper == DOUT * DIN + DOUT


# ---- FLOPs: the BERT model ---------------------------------------------------------------------


def hand_bert(L, d, f, h, V, t, n, k):
    """Independent hand count (multiply-adds x 2) of the benchmark's BERT MLM."""
    per_layer = {
        "qkvo": 4 * t * d * d,
        "scores": h * t * t * (d // h),
        "context": h * t * t * (d // h),
        "ffn": t * 2 * d * f,
    }
    head = t * d * d + t * d * V
    dense_macs = L * sum(per_layer.values()) + head
    return {
        "dense": 2 * dense_macs,
        # routers, and fc1's gated biases as one [T, N] x [N, f] product (dispatch.py)
        "moe": 2 * (dense_macs + L * ((k - 1) * per_layer["ffn"] + t * (d + f) * n + t * n * f)),
        "meo": 2 * (dense_macs + L * (d + f) * n) + L * k * (2 * d * f + d + f),
    }


def test_tiny_bert_matches_hand_count():
    spec = dict(layers=2, dim=16, ffn=32, heads=2, vocab=50)
    r = FL.measure(None, seq_len=8, experts=4, top_k=2, **spec)
    want = hand_bert(2, 16, 32, 2, 50, 8, 4, 2)
    for mode in ("dense", "moe", "meo"):
        assert r["gflops"][mode] * 1e9 == pytest.approx(want[mode], abs=0.5), mode
        assert r["formula_gflops"][mode] == pytest.approx(r["gflops"][mode], rel=1e-12)
    assert r["gflops"]["meo_as_run"] * 1e9 == pytest.approx(
        want["meo"] - 2 * 2 * (2 * 16 * 32 + 48) + 2 * 2 * 4 * (2 * 16 * 32 + 48), abs=0.5
    )
    assert "rel_err" not in r  # only the paper's configuration is checked against the paper


@pytest.fixture(scope="module")
def bert_base():
    return FL.measure("bert-base", seq_len=128, experts=16, top_k=4)


def test_bert_base_reproduces_the_paper(bert_base):
    g = bert_base["gflops"]
    assert abs(g["moe"] / 72.0 - 1) <= 0.02
    assert abs(g["meo"] / 28.6 - 1) <= 0.02
    assert abs(g["dense"] / 28.5 - 1) <= 0.005
    assert bert_base["reproduced"] is True
    # the exact counts
    want = hand_bert(12, 768, 3072, 12, 30522, 128, 16, 4)
    for mode in ("dense", "moe", "meo"):
        assert g[mode] * 1e9 == pytest.approx(want[mode], abs=1)
    assert g["dense"] * 1e9 == 28_499_116_032
    m = bert_base["merge_gflops"]
    p_ffn = 2 * 768 * 3072 + 768 + 3072
    assert m["paper"] * 1e9 == pytest.approx(12 * 4 * p_ffn, abs=1)  # k x P_ffn per layer
    assert m["dense_product"] * 1e9 == pytest.approx(12 * 2 * 16 * p_ffn, abs=1)
    assert g["meo_as_run"] == pytest.approx(g["meo"] - m["paper"] + m["dense_product"], rel=1e-12)


def test_flops_cli_json(capsys):
    rc = bench_main(
        [
            "flops",
            "--layers",
            "1",
            "--dim",
            "16",
            "--ffn",
            "32",
            "--heads",
            "2",
            "--vocab",
            "40",
            "--seq-len",
            "6",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gflops"]["dense"] * 1e9 == pytest.approx(
        hand_bert(1, 16, 32, 2, 40, 6, 4, 2)["dense"], abs=0.5
    )
    assert out["preset"] is None


def test_sweep_figure(tmp_path):
    rows = [
        {
            "preset": p,
            "top_k": k,
            "experts": 32,
            "seq_len": 128,
            "dense": 10.0 * s,
            "moe": 10.0 * s * k,
            "meo": 10.1 * s,
            "meo_as_run": 11.0 * s,
        }
        for s, p in ((1, "bert-small"), (3, "bert-base"))
        for k in FL.SWEEP_K
    ]
    path = tmp_path / "fig.png"
    FL.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_counts_real_models():
    rows = FL.sweep(presets=["bert-small"], ks=[1, 2], experts=4, seq_len=8)
    assert [r["top_k"] for r in rows] == [1, 2]
    spec = FL.PRESETS["bert-small"]
    for r in rows:
        want = hand_bert(
            spec["layers"], spec["dim"], spec["ffn"], spec["heads"], FL.BERT_VOCAB, 8, 4, r["top_k"]
        )
        assert r["moe"] * 1e9 == pytest.approx(want["moe"], abs=1)
        assert r["meo"] * 1e9 == pytest.approx(want["meo"], abs=1)


# ---- layers: variants and memory measures (no timing asserted) ---------------------------------


def test_layer_variants_configs():
    assert LY.variant_config("moe-token", 16, 4).routing == "token"
    assert LY.variant_config("moe-seq", 16, 4).mode == "moe"
    assert LY.variant_config("meo", 16, 4).token_block is False
    assert LY.variant_config("meo-token", 16, 4).token_block is True
    with pytest.raises(ValueError):
        LY.variant_config("nope", 16, 4)


def test_saved_bytes_dense_by_hand_and_meo_keeps_no_merged_weights():
    d, f, b, t = 32, 64, 2, 64  # 64 tokens per sequence: the layer's cost model merges
    x = torch.randn(b, t, d)
    dense = LY.build("dense", d, f, 8, 2, "cpu", torch.float32)
    # fc1 saves its input, GELU its input, fc2 its input (the GELU output); fp32
    assert LY.saved_bytes(dense, x) == 4 * b * t * (d + f + f)
    meo = LY.build("meo", d, f, 8, 2, "cpu", torch.float32)
    assert meo.fc1.choose_merge(b, t, cached=False)
    merged = 4 * b * (d * f) * 2  # what keeping the merged fc1 and fc2 weights would cost
    assert LY.saved_bytes(meo, x) < LY.saved_bytes(dense, x) + merged / 4


def test_peak_memory_excludes_parameter_gradients():
    d, f, b, t = 32, 64, 2, 4
    x = torch.randn(b, t, d)
    probe = torch.randn(b, t, d)
    for v in ("dense", "meo", "moe-token"):
        m = LY.build(v, d, f, 8, 2, "cpu", torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peak = LY.peak_memory(m, x, probe)
        grads = sum(p.numel() * p.element_size() for p in m.parameters())
        assert peak > 0
        if v == "meo":  # the kept scratch memory (merged weights) is counted in full
            assert scratch_bytes() >= 4 * b * d * f and peak >= scratch_bytes()
        if v == "moe-token":  # so are compute-then-mix's kept outputs and input gradients (fp32)
            kept = LY.kept_bytes(m)
            assert kept == 4 * b * t * (f + d) * 2 and peak >= kept
        if v != "dense":
            # the expert gradients (8 experts) alone are larger than anything else in the step
            assert peak < grads


def test_run_shape_ratios_and_targets():
    r = LY.run_shape(
        2, 4, 16, 32, 4, 2, repeats=1, device="cpu", dtype=torch.float32, variants=("meo",), memory=True
    )
    res = r["results"]
    assert set(res) == {"dense", "meo"}
    assert res["dense"]["ratio"] == {"fwd": 1.0, "fwd_bwd": 1.0, "peak": 1.0, "saved": 1.0}
    assert set(res["meo"]["ratio"]) == {"fwd", "fwd_bwd", "peak", "saved"}
    f = res["meo"]["floor"]
    assert f["experts_mb"] == 2 * 4 * 16 * 32 * 4 / 2**20  # both linears' [4, 32, 16] fp32 experts
    d = res["dense"]
    assert f["fwd"] == pytest.approx(1 + f["read_ms"] / d["fwd_ms"])
    assert f["fwd_bwd"] == pytest.approx(1 + (2 * f["read_ms"] + f["write_ms"]) / d["fwd_bwd_ms"])
    assert "MEO memory-traffic floor" in LY.table(
        r,
        dict(
            dim=16,
            ffn=32,
            experts=4,
            top_k=2,
            device="cpu",
            dtype="float32",
            repeats=1,
            clock="wall",
            threads=1,
        ),
    )
    fake = [
        {
            "batch": 16,
            "tokens": 128,
            "results": {"meo": {"ratio": {"fwd_bwd": 1.2, "fwd": 1.5, "peak": 1.0}, "floor": {"fwd": 1.1}}},
        }
    ]
    got = {(t["metric"], tuple(t["shape"])): (t["met"], t.get("floor")) for t in LY.check_targets(fake)}
    assert got == {
        ("fwd_bwd", (16, 128)): (True, None),
        ("fwd", (16, 128)): (False, 1.1),
        ("peak", (16, 128)): (True, None),
    }


# ---- model: log parsing and commands -----------------------------------------------------------


def test_parse_fairseq_logs():
    log = "\n".join(
        [
            (
                "2024-01-01 | INFO | train_inner | epoch 001:     10 / 25 "
                "loss=9.1, wps=1000, ups=2, num_updates=10"
            ),
            (
                "2024-01-01 | INFO | train_inner | epoch 001:     20 / 25 "
                "loss=8.1, wps=3000, ups=2, num_updates=20"
            ),
            (
                "2024-01-01 | INFO | train_inner | epoch 002:     30 / 25 "
                "loss=7.1, wps=5000, ups=2, num_updates=30"
            ),
            "2024-01-01 | INFO | train | epoch 001 | loss 8 | wps 1e+06",
        ]
    )
    w = MD.train_wps(log)
    assert w["wps"] == 4000 and w["wps_intervals"] == [1000, 3000, 5000]
    g = MD.generate_speed(
        "INFO | fairseq_cli.generate | Translated 1,020 sentences (61,200 tokens) in 12.5s "
        "(81.60 sentences/s, 4896.00 tokens/s)"
    )
    assert g == {
        "sentences": 1020,
        "gen_tokens": 61200,
        "gen_seconds": 12.5,
        "sentences_per_s": 81.6,
        "tokens_per_s": 4896.0,
    }
    with pytest.raises(MD.BenchmarkError):
        MD.train_wps("nothing here")


def test_median_speed_of_repeated_generate_runs():
    runs = [
        MD.generate_speed(
            f"Translated 10 sentences (600 tokens) in {t}s ({10 / t:.2f} sentences/s, {600 / t:.2f} tokens/s)"
        )
        for t in (2.0, 1.0, 4.0)
    ]
    m = MD.median_speed(runs)
    assert m["runs"] == [5.0, 10.0, 2.5]
    assert (m["sentences_per_s"], m["tokens_per_s"], m["gen_seconds"]) == (5.0, 300.0, 2.0)
    assert (m["sentences"], m["gen_tokens"]) == (10, 600)


def test_model_commands(tmp_path):
    import argparse

    a = argparse.Namespace(
        experts=8,
        top_k=2,
        updates=20,
        log_interval=5,
        max_tokens=1024,
        cpu=True,
        gen_subset="test",
        gen_len=50,
        precision="fp32",
    )
    for task in ("xsum", "lm"):
        for mode in MD.MODES:
            cmd = [str(c) for c in MD.train_cmd(task, tmp_path, "some_arch", mode, a, tmp_path / "ck")]
            assert cmd[cmd.index("--moe-mode") + 1] == mode
            assert "--cpu" in cmd and cmd[cmd.index("--max-update") + 1] == "20"
    cmd = [str(c) for c in MD.generate_cmd(tmp_path, tmp_path / "c.pt", a, *MD.gen_setting("32x6"))]
    assert cmd[cmd.index("--beam") + 1] == "6" and cmd[cmd.index("--batch-size") + 1] == "32"
    assert cmd[cmd.index("--gen-subset") + 1] == "test"
    assert cmd[cmd.index("--min-len") + 1] == cmd[cmd.index("--max-len-b") + 1] == "50"  # fixed length
    assert MD.gen_setting(" 1 x 1") == (1, 1)
    # precisions: fp32 is fairseq's own train entry with no flag; bf16 goes through meo_fairseq.train
    # (fairseq-train --bf16 means --tpu); fp16 generates in fp16, bf16 in fp32
    for precision, entry, flag, gen_flag in (
        ("fp32", "fairseq_cli.train", None, None),
        ("bf16", "meo_fairseq.train", "--bf16", None),
        ("fp16", "fairseq_cli.train", "--fp16", "--fp16"),
    ):
        a.precision = precision
        for task in ("xsum", "lm"):
            cmd = [str(c) for c in MD.train_cmd(task, tmp_path, "some_arch", "meo", a, tmp_path / "ck")]
            assert cmd[cmd.index("-m") + 1] == entry
            assert [c for c in cmd if c in ("--fp16", "--bf16")] == ([flag] if flag else [])
        cmd = [str(c) for c in MD.generate_cmd(tmp_path, tmp_path / "c.pt", a, 1, 1)]
        assert [c for c in cmd if c in ("--fp16", "--bf16")] == ([gen_flag] if gen_flag else [])
    # --train-args come last (a repeated option wins); --no-generate trains xsum without saving
    a.train_args, a.no_generate = "--moe-compile --moe-top-k 1", True
    for task in ("xsum", "lm"):
        cmd = [str(c) for c in MD.train_cmd(task, tmp_path, "some_arch", "meo", a, tmp_path / "ck")]
        assert cmd[-3:] == ["--moe-compile", "--moe-top-k", "1"] and cmd.count("--moe-top-k") == 2
        assert "--no-save" in cmd and "--save-dir" not in cmd
    a.no_generate = False
    cmd = [str(c) for c in MD.train_cmd("xsum", tmp_path, "some_arch", "meo", a, tmp_path / "ck")]
    assert "--no-save" not in cmd and cmd[cmd.index("--save-dir") + 1] == str(tmp_path / "ck")
    for bad in ("32", "0x6", "ax1"):
        with pytest.raises(ValueError, match="--gen"):
            MD.gen_setting(bad)


def _row(task, mode, wps, gen):
    return {
        "task": task,
        "arch": "a",
        "mode": mode,
        "wps": wps,
        "gen": {k: {"sentences_per_s": v, "tokens_per_s": 10 * v} for k, v in gen.items()},
    }


def test_model_targets_and_table():
    rows = [
        _row("xsum", "dense", 1000, {"1x1": 10.0, "32x6": 4.0}),
        _row("xsum", "moe", 500, {"1x1": 8.0, "32x6": 2.5}),
        _row("xsum", "meo", 900, {"1x1": 8.9, "32x6": 2.0}),
        _row("lm", "dense", 2000, {}),
        _row("lm", "meo", 1600, {}),
    ]
    for r in rows:  # as run() does
        d = next(x for x in rows if x["task"] == r["task"] and x["mode"] == "dense")
        r["ratio"] = {"wps": r["wps"] / d["wps"]}
        for k, g in r["gen"].items():
            g["ratio"] = {q: g[q] / d["gen"][k][q] for q in ("sentences_per_s", "tokens_per_s")}
    got = {(t["task"], t["figure"]): (round(t["ratio"], 3), t["met"]) for t in MD.check_targets(rows)}
    assert got == {
        ("xsum", "train wps MEO/dense"): (0.9, True),
        ("xsum", "generate 1x1 sentences/s MEO/dense"): (0.89, False),
        ("xsum", "generate 32x6 sentences/s MEO/dense"): (0.5, False),  # >= 0.5x but behind MoE (2.5)
        ("lm", "train wps MEO/dense"): (0.8, False),
    }
    text = MD.table({"experts": 8, "top_k": 2, "updates": 4, "rows": rows, "targets": MD.check_targets(rows)})
    assert "gen 32x6 sent/s" in text and "NOT met" in text


def test_main_usage(capsys):
    assert bench_main([]) == 2
    assert bench_main(["nope"]) == 2


# ---- the blocked merge of merge.py (sped up together with these benchmarks) --------------------


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(
    "block", [(1, 1), (8 * 5 * 8, 2), (2**30, 128)]
)  # (MERGE_BLOCK_BYTES, MERGE_MIN_ROWS)
def test_blocked_merged_linear_matches_vanilla_moe(monkeypatch, groups, sparse, block):
    from meo_fairseq.modules import merge as M

    monkeypatch.setattr(M, "MERGE_BLOCK_BYTES", block[0])
    monkeypatch.setattr(M, "MERGE_MIN_ROWS", block[1])
    d = torch.float64
    g, t, i, o, n = groups, 4, 5, 7, 6
    torch.manual_seed(groups)
    x = torch.randn(g, t, i, dtype=d, requires_grad=True)
    if sparse:  # top-2 gates: one group reads only its selected experts
        v, idx = torch.randn(g, n, dtype=d).topk(2, -1)
        gates = torch.zeros(g, n, dtype=d).scatter(1, idx, v.softmax(-1))
    else:
        gates = torch.rand(g, n, dtype=d)
    gates.requires_grad_(True)
    w = torch.randn(n, o, i, dtype=d, requires_grad=True)
    b = torch.randn(n, o, dtype=d, requires_grad=True)
    blocks = M._row_blocks(g, w)
    assert blocks[0][0] == 0 and blocks[-1][1] == o and all(a[1] == c[0] for a, c in zip(blocks, blocks[1:]))
    if block[0] == 1:
        assert len(blocks) == o  # one row at a time
    probe = torch.randn(g, t, o, dtype=d)
    y = M.merged_linear(x, gates, w, b)
    ref = sum(gates[:, e, None, None] * (x @ w[e].t() + b[e]) for e in range(n))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad((y * probe).sum(), [x, gates, w, b])
    want = torch.autograd.grad((ref * probe).sum(), [x, gates, w, b])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
