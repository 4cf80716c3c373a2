"""The quality study (meo_fairseq/benchmark/quality.py) and the initialisation options (models/init.py)."""

import json
import math

import pytest
import torch
from test_models_build import _save
from test_models_incremental import build

from meo_fairseq.benchmark import quality as Q
from meo_fairseq.benchmark.__main__ import main as bench_main
from meo_fairseq.models.init import apply_init

TRAIN_LOG = """\
2026-01-01 | INFO | fairseq_cli.train | num. shared model params: 701,536 (num. trained: 701,536)
2026-01-01 | INFO | train_inner | epoch 001:     25 / 93 loss=11.2, moe_aux=0.01, ppl=2461.33, \
wps=20297.3, ups=10, wpb=2047, num_updates=25, lr=0.0008
2026-01-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.5 | moe_aux 0.2 \
| ppl 724.08 | wps 61950.1 | num_updates 50
2026-01-01 | INFO | train_inner | epoch 001:     50 / 93 loss=9.8, ppl=930.27, wps=17068.1, ups=5, \
wpb=1996.8, num_updates=50, lr=0.0016
2026-01-01 | INFO | train_inner | epoch 001:     75 / 93 loss=9.0, ppl=518.6, wps=20093.9, ups=4, \
wpb=2048, num_updates=75, lr=0.00182574
2026-01-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.0 | ppl 512 | wps 1 | num_updates 100
$ resumed from the checkpoint of update 50
2026-01-01 | INFO | train_inner | epoch 001:     75 / 93 loss=9.0, ppl=518.6, wps=20093.9, ups=2.5, \
wpb=2048, num_updates=75, lr=0.00182574
2026-01-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.5 | ppl 362 | wps 1 | num_updates 100
"""


def test_parse_train_log_last_value_per_update_wins():
    r = Q.parse_train_log(TRAIN_LOG)
    assert r["curve"] == [(50, 9.5), (100, 8.5)]  # the resumed run's value at 100
    assert r["sec_per_update"] == pytest.approx(0.2)  # median of 1/10, 1/5, 1/2.5 (update 75 re-logged)
    assert r["params"] == 701536
    assert math.isnan(Q.parse_train_log("nothing")["sec_per_update"])


def test_parse_eval_log():
    text = "INFO:fairseq_cli.eval_lm:Loss (base 2): 8.6429, Perplexity: 399.72\n"
    assert Q.parse_eval_log(text) == {"eval_loss": 8.6429, "eval_ppl": 399.72}
    with pytest.raises(Q.StudyError, match="Perplexity"):
        Q.parse_eval_log("no summary")


def _res(curve, spu):
    return {"curve": curve, "sec_per_update": spu, "params": 10, "eval_ppl": 2 ** curve[-1][1]}


def test_summary_at_equal_updates_and_equal_time():
    # dense: 0.1 s/update; moe: 0.2 s/update. Budget of a seed = dense's total time (20 s for 200 updates),
    # where moe has done 100 updates.
    runs = {
        "scratch": {
            "dense": {1: _res([(100, 8.0), (200, 7.0)], 0.1), 2: _res([(100, 8.0), (200, 6.0)], 0.1)},
            "moe": {
                1: _res([(100, 9.0), (200, 5.0)], 0.2),
                2: _res([(50, 10.0), (150, 8.0), (200, 4.0)], 0.2),
            },
        }
    }
    s = Q.summarize(runs)["scratch"]
    assert s["dense"]["valid_ppl"][0] == pytest.approx((2**7 + 2**6) / 2)
    assert s["dense"]["valid_ppl"][1] == pytest.approx(math.sqrt(((2**7 - 2**6) ** 2) / 2))
    assert s["dense"]["valid_ppl_equal_time"][0] == pytest.approx((2**7 + 2**6) / 2)
    # moe at 20 s = update 100: seed 1 exactly 9.0 bits; seed 2 halfway between (50, 10) and (150, 8): 9.0
    assert s["moe"]["valid_ppl_equal_time"] == pytest.approx((2**9, 0.0))
    assert s["moe"]["valid_ppl"][0] == pytest.approx((2**5 + 2**4) / 2)
    assert s["moe"]["sec_per_update"][0] == pytest.approx(0.2)
    # paired by seed: (2**5 - 2**7, 2**4 - 2**6) = (-96, -48)
    assert s["moe"]["valid_ppl_minus_dense"] == pytest.approx((-72.0, math.sqrt(2 * 24**2)))
    # outside the curve: no value
    assert math.isnan(Q._at_time([(100, 8.0)], 0.1, 5.0))
    assert math.isnan(Q.mean_std([1.0])[1])
    text = Q.table(Q.summarize(runs), 200, "test")
    assert "valid ppl @200 upd" in text and "512.0 ± 0.0" in text


def test_commands(tmp_path):
    a = Q.build_parser().parse_args(
        [
            "--data",
            str(tmp_path),
            "--args",
            "--lr 5e-4 --decoder-embed-dim 128",
            "--expert-args=--no-moe-gate-noise",
        ]
    )
    up = tmp_path / "dense.pt"
    for name, flags in Q.VARIANTS.items():
        for ckpt in (None, up):
            cmd = Q.train_cmd(a, flags, tmp_path / "run", 600, 3, ckpt)
            assert cmd[-2:] == ["--save-dir", str(tmp_path / "run")]
            assert cmd[cmd.index("--moe-mode") + 1] == name.split("_")[0]
            assert cmd[cmd.index("--max-update") + 1] == "600" and cmd[cmd.index("--seed") + 1] == "3"
            assert ("--moe-upcycle-from" in cmd) == (ckpt is not None)
            # the learning rate of the continuation; --args come after, so they override both
            lrs = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--lr"]
            assert lrs == [str(a.upcycle_lr if ckpt else a.lr), "5e-4"]
            assert ("--no-moe-gate-noise" in cmd) == (name != "dense")
            assert "--user-dir" in cmd and "--decoder-embed-dim" in cmd
    assert "--moe-decoder-routing segment" in Q.VARIANTS["meo"]
    assert "--moe-level token" in Q.VARIANTS["meo_token"] and "--moe-mode meo" in Q.VARIANTS["meo_token"]
    k1 = Q.run_key(Q.train_cmd(a, Q.VARIANTS["moe"], tmp_path / "a", 600, 1))
    assert k1 == Q.run_key(
        Q.train_cmd(a, Q.VARIANTS["moe"], tmp_path / "b", 600, 1)
    )  # the save dir is no part
    assert k1 != Q.run_key(Q.train_cmd(a, Q.VARIANTS["moe"], tmp_path / "a", 600, 2))
    # a moved checkout (another --user-dir) is the same run; another option is not
    moved = k1.replace(str(Q.REPO / "meo_fairseq"), "/elsewhere/meo_fairseq")
    assert moved != k1 and Q.same_run(moved, k1)
    assert not Q.same_run(k1, Q.run_key(Q.train_cmd(a, Q.VARIANTS["moe"], tmp_path / "a", 600, 2)))
    cmd = Q.eval_cmd(a, tmp_path / "c.pt")
    assert (
        cmd[cmd.index("--path") + 1] == str(tmp_path / "c.pt")
        and cmd[cmd.index("--gen-subset") + 1] == "test"
    )
    assert Q.is_dense("--moe-mode moe --moe-mode dense") and not Q.is_dense("--moe-mode moe")


def test_bad_options(tmp_path, capsys):
    assert Q.parse_variant("moe_nn=--moe-mode moe --no-moe-gate-noise") == (
        "moe_nn",
        "--moe-mode moe --no-moe-gate-noise",
    )
    for bad in ("noequals", "a b=--x", "=--x"):
        with pytest.raises(ValueError, match="--variant"):
            Q.parse_variant(bad)
    with pytest.raises(SystemExit, match="--data"):
        Q.main(["--data", str(tmp_path)])
    (tmp_path / "dict.txt").write_text("a 1\n")
    with pytest.raises(SystemExit, match="--variants: unknown variant 'nope'"):
        Q.main(["--data", str(tmp_path), "--variants", "dense,nope"])
    with pytest.raises(SystemExit, match="--updates 30"):
        Q.main(["--data", str(tmp_path), "--updates", "30", "--valid-every", "20", "--log-interval", "5"])
    with pytest.raises(SystemExit, match="--settings"):
        Q.main(["--data", str(tmp_path), "--settings", "finetuned"])


# ---- initialisation options --------------------------------------------------------------------


def _lm_out(model, d):
    tokens = torch.randint(4, len(d), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)[0]


LM = ["--moe-experts", "4", "--moe-top-k", "2", "--moe-segment-length", "8", "--tokens-per-sample", "64"]


@pytest.mark.parametrize("variant", ["moe", "meo", "meo_token"])
def test_random_router_keeps_upcycling_exact(tmp_path, variant):
    dense, d = build("meo_transformer_lm_tiny", "language_modeling", LM + ["--moe-mode", "dense"])
    _save(dense, tmp_path / "dense.pt")
    flags = Q.VARIANTS[variant].split() + LM + ["--moe-upcycle-from", str(tmp_path / "dense.pt")]
    # build() itself randomises the routers (as a test of routing); re-apply the option after it, as
    # build_model does after upcycling
    zero, _ = build("meo_transformer_lm_tiny", "language_modeling", flags)
    with torch.no_grad():
        for n, p in zero.named_parameters():
            if ".router." in n:
                p.zero_()
    args = Q.build_parser().parse_args(["--data", "x"])  # any namespace: apply_init reads only its fields
    args.moe_router_init, args.moe_router_init_std, args.moe_upcycle_from = "normal", 0.5, "dense.pt"
    torch.manual_seed(1)
    apply_init(zero, args)
    gates = [p for n, p in zero.named_parameters() if n.endswith("router.w_gate")]
    assert len(gates) == 4 and all(0.3 < float(g.detach().std()) < 0.7 for g in gates)
    assert all(float(p.abs().max()) == 0 for n, p in zero.named_parameters() if n.endswith("router.w_noise"))
    torch.testing.assert_close(_lm_out(zero, d), _lm_out(dense, d), rtol=1e-5, atol=1e-5)


def test_expert_init_scale_and_errors():
    model, _ = build(
        "meo_transformer_lm_tiny", "language_modeling", LM + ["--moe-mode", "moe", "--moe-level", "token"]
    )
    before = {n: p.clone() for n, p in model.named_parameters()}
    args = Q.build_parser().parse_args(["--data", "x"])
    args.moe_router_init, args.moe_router_init_std, args.moe_expert_init_scale, args.moe_upcycle_from = (
        "zero",
        0.1,
        2.0,
        None,
    )
    apply_init(model, args)
    scaled = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(scaled) == sorted(n for n in before if n.endswith("experts.weight")) and len(scaled) == 4
    for n in scaled:
        torch.testing.assert_close(dict(model.named_parameters())[n], 2 * before[n])
    for field, value, flag in (
        ("moe_router_init", "uniform", "--moe-router-init"),
        ("moe_router_init_std", -1.0, "--moe-router-init-std"),
        ("moe_expert_init_scale", 0.0, "--moe-expert-init-scale"),
        ("moe_upcycle_from", "d.pt", "--moe-expert-init-scale"),
    ):
        bad = Q.build_parser().parse_args(["--data", "x"])
        bad.moe_router_init, bad.moe_router_init_std, bad.moe_expert_init_scale, bad.moe_upcycle_from = (
            "zero",
            0.1,
            2.0,
            None,
        )
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=flag):
            apply_init(model, bad)


def test_default_expert_init_scale_is_sqrt_k_from_scratch():
    """--moe-expert-init-scale not given: sqrt(k) per linear from scratch (k = top-k less the
    compressed experts), k ** 0.25 for vanilla MoE over whole-FFN experts, 1 when upcycling; the
    experts' weights are scaled by it and nothing else is."""
    from argparse import Namespace

    from meo_fairseq.models.init import default_expert_init_scale

    def scale(**kw):
        return default_expert_init_scale(Namespace(**kw), upcycled=False)

    assert scale(moe_top_k=2) == pytest.approx(math.sqrt(2))
    assert scale(moe_top_k=4, moe_compressed_experts=1) == pytest.approx(math.sqrt(3))
    assert scale(moe_mode="moe", moe_top_k=4, moe_expert_unit="linear") == pytest.approx(2.0)
    assert scale(moe_mode="moe", moe_top_k=4, moe_expert_unit="ffn") == pytest.approx(math.sqrt(2))
    assert scale(moe_mode="meo", moe_top_k=4, moe_expert_unit="ffn") == pytest.approx(2.0)
    assert default_expert_init_scale(Namespace(moe_top_k=4), upcycled=True) == 1.0
    flags = LM + ["--moe-mode", "meo", "--moe-top-k", "2"]
    model, _ = build("meo_transformer_lm_tiny", "language_modeling", flags)
    before = {n: p.clone() for n, p in model.named_parameters()}
    args = Q.build_parser().parse_args(["--data", "x"])
    args.moe_top_k, args.moe_router_init, args.moe_expert_init_scale, args.moe_upcycle_from = (
        2,
        "zero",
        None,
        None,
    )
    apply_init(model, args)
    for n, p in model.named_parameters():
        if n.endswith("experts.weight"):
            torch.testing.assert_close(p, math.sqrt(2) * before[n])
        else:
            assert torch.equal(p, before[n]), n


# ---- end to end (fairseq-train, fairseq-eval-lm) ------------------------------------------------


def test_study_end_to_end(lm_bin, tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "quality",
        "--data",
        str(lm_bin),
        "--out",
        str(out),
        "--seeds",
        "1",
        "--updates",
        "4",
        "--pretrain-updates",
        "4",
        "--valid-every",
        "2",
        "--log-interval",
        "1",
        "--tokens-per-sample",
        "64",
        "--max-tokens",
        "512",
        "--experts",
        "4",
        "--segment-length",
        "16",
        "--eval-subset",
        "valid",
        # the finding: upcycled copies with a zero router and no gate noise stay the dense
        # model (why --moe-router-init auto is normal when upcycling)
        "--variant",
        "moe_nonoise=--moe-mode moe --moe-level token --no-moe-gate-noise --moe-router-init zero",
        "--variants",
        "dense,moe_nonoise",
    ]  # (every variant's flags: test_commands)
    assert bench_main(argv) == 0
    text = capsys.readouterr().out
    assert "[quality] [5/5] upcycled/moe_nonoise seed 1" in text and "valid ppl @4 upd" in text
    assert "[3/5] pretrain/dense seed 1: done before" in text  # the scratch dense run is the pretraining
    res = json.loads((out / "results.json").read_text())
    for setting in ("scratch", "upcycled"):
        for name in ("dense", "moe_nonoise"):
            r = res["runs"][setting][name]["1"]
            assert [u for u, _ in r["curve"]] == [2, 4]
            assert r["eval_ppl"] > 1 and r["sec_per_update"] > 0
            assert res["summary"][setting][name]["valid_ppl"][0] == pytest.approx(2 ** r["curve"][-1][1])
    up = res["runs"]["upcycled"]
    assert up["moe_nonoise"]["1"]["curve"] == up["dense"]["1"]["curve"]
    assert up["moe_nonoise"]["1"]["eval_ppl"] == pytest.approx(up["dense"]["1"]["eval_ppl"], rel=1e-4)
    # upcycled runs start from the dense checkpoint: better than from scratch after as many updates
    assert up["dense"]["1"]["curve"][0][1] < res["runs"]["scratch"]["dense"]["1"]["curve"][0][1]
    assert (out / "curves.png").stat().st_size > 1000
    # resumable: a second invocation reruns nothing; changed options are refused, not mixed in
    assert bench_main(argv) == 0
    assert capsys.readouterr().out.count("done before") == 5
    with pytest.raises(Q.StudyError, match="other options"):
        bench_main(argv[:-2] + ["--variants", "moe_nonoise", "--expert-args", "--moe-balance-weight 0.1"])
    # a finished run is reused only while its resolved options hold: a default that changed since
    # (here faked by editing what the run recorded) refuses it, naming the option
    path = out / "scratch" / "moe_nonoise" / "seed1" / "result.json"
    run = json.loads(path.read_text())
    assert (
        run["resolved"]["layer"]["gate_noise"] is False and run["resolved"]["init"]["router_init"] == "zero"
    )
    run["resolved"]["layer"]["balance_weight"] = 0.5
    path.write_text(json.dumps(run))
    with pytest.raises(
        Q.StudyError, match=r"other defaults of the plugin:\n  layer.balance_weight: 0.5 then"
    ):
        bench_main(argv)
    # a run recorded before resolved options were kept is refused, or reused on request (the log
    # says it was not compared)
    del run["resolved"]
    path.write_text(json.dumps(run))
    with pytest.raises(Q.StudyError, match="cannot be checked: use another --out .* or --reuse-unchecked"):
        bench_main(argv)
    capsys.readouterr()
    assert bench_main(argv + ["--reuse-unchecked"]) == 0
    assert "not compared with the current defaults: (the run predates" in capsys.readouterr().out


def test_resolved_options_of_the_runs(tmp_path):
    """What a run records besides its command: the expert layer's configuration and initialisation
    with every default resolved (sqrt(k) and a zero router from scratch, scale 1 and a random
    router when upcycling, no gate noise), the model's sizes; the dense FFN records only its mode."""
    a = Q.build_parser().parse_args(["--data", str(tmp_path), "--args", "--decoder-embed-dim 128"])
    scratch = Q.resolved_options(Q.train_cmd(a, Q.VARIANTS["meo"], tmp_path / "r", 600, 1))
    up = Q.resolved_options(Q.train_cmd(a, Q.VARIANTS["meo"], tmp_path / "r", 600, 1, tmp_path / "d.pt"))
    assert scratch["init"] == {"router_init": "zero", "router_init_std": 0.1, "expert_init_scale": 2**0.5}
    assert up["init"] == {"router_init": "normal", "router_init_std": 0.1, "expert_init_scale": 1.0}
    assert scratch["layer"] == up["layer"] and scratch["layer"]["gate_noise"] is False
    assert (scratch["layer"]["mode"], scratch["layer"]["routing"], scratch["layer"]["top_k"]) == (
        "meo",
        "segment",
        2,
    )
    assert "impl" not in scratch["layer"] and scratch["sizes"]["decoder_embed_dim"] == 128
    # options that mean nothing for the layer are left out (their "auto" may resolve either way)
    assert "token_block_order" not in scratch["layer"] and "compressed_weighting" not in scratch["layer"]
    token = Q.resolved_options(Q.train_cmd(a, Q.VARIANTS["meo_token"], tmp_path / "r", 600, 1))
    assert token["layer"]["token_block_order"] in ("route_first", "block_first")
    dense = Q.resolved_options(Q.train_cmd(a, Q.VARIANTS["dense"], tmp_path / "r", 600, 1))
    assert dense["layer"] == {"mode": "dense"} and dense["init"] == {}
    assert Q.resolved_differences(scratch, scratch) == ([], [])
    changed, one_sided = Q.resolved_differences(scratch, {**up, "new": {"x": 1}})
    assert changed == [
        "init.expert_init_scale: 1.4142135623730951 then, 1.0 now",
        "init.router_init: 'zero' then, 'normal' now",
    ]
    assert one_sided == ["new.x"]
    bad = Q.train_cmd(a, Q.VARIANTS["meo"] + " --moe-mode nope", tmp_path / "r", 600, 1)
    with pytest.raises(Q.StudyError, match="argument --moe-mode: invalid choice: 'nope'"):
        Q.resolved_options(bad)
