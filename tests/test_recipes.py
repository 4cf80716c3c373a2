"""Training and evaluation recipes: scripts/train_{xsum,wikitext,squad}.sh and eval_*.sh.

End to end on tests/data, for each data set: scripts/prepare_*.sh (small vocabulary) -> train_*.sh
with a tiny model and a few updates -> eval_*.sh; the scores must be sane and there must be exactly
one hypothesis per input id. Also: the recipes' fairseq command lines (printed by --dry-run) parse
with fairseq and carry the paper's settings, extra options override them, the GPU branch builds the
distributed/fp16 command, upcycling from a dense fairseq checkpoint, and bad arguments.

The tiny runs are CPU-sized (a few seconds of training each); most of the time is process start-up.
OMP_NUM_THREADS=1 keeps torch from oversubscribing a small shared machine.
"""

import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SCRIPTS = REPO / "scripts"
VOCAB = "500"

TINY_SEQ2SEQ = [
    "--arch", "meo_transformer_tiny", "--max-update", "8", "--max-tokens", "1024", "--update-freq", "1",
    "--moe-experts", "4", "--moe-top-k", "2", "--lr", "1e-3", "--warmup-updates", "2",
    "--no-epoch-checkpoints",
]  # fmt: skip


def env(**extra):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("MEO_NUM_GPUS", "MEO_BF16", "MEO_LAUNCHER", "MEO_TORCHRUN_ARGS", "MEO_BF16_SUPPORTED"):
        e.pop(key, None)
    e.update(extra)
    return e


def run_script(name, *args, timeout=300, **env_extra):
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *map(str, args)],
        capture_output=True, text=True, env=env(**env_extra), cwd=str(REPO), timeout=timeout,
    )  # fmt: skip


def ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


def lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def idx_sizes(path):
    """Sequence lengths stored in a fairseq MMapIndexedDataset .idx file."""
    data = Path(path).read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00", path
    (n,) = struct.unpack("<Q", data[18:26])
    return list(struct.unpack(f"<{n}i", data[26 : 26 + 4 * n]))


def printed_command(proc):
    """The fairseq command a script printed (its first `command:` line), as an argv list."""
    for line in proc.stderr.splitlines():
        m = re.match(r"\[[\w.]+\] command: (.*)$", line)
        if m:
            return shlex.split(m.group(1))
    raise AssertionError(f"no command printed:\n{proc.stderr}")


def hyp_ids(generate_out):
    """Sample ids of the H- lines of a fairseq-generate output, in file order."""
    return [
        int(m.group(1))
        for m in re.finditer(r"^H-(\d+)\t", Path(generate_out).read_text(encoding="utf-8"), re.M)
    ]


def check_one_hypothesis_per_id(data, out, subset="test"):
    ids = lines(data / f"{subset}.id")
    assert len(ids) > 0
    assert len(lines(out / "hyp.txt")) == len(ids)
    got = hyp_ids(out / f"generate-{subset}.txt")
    assert sorted(got) == list(range(len(ids))), "exactly one H- line per sample id"
    assert "\u2581" not in (out / "hyp.txt").read_text(encoding="utf-8"), (
        "hypotheses are sentencepiece-decoded"
    )


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("squad") / "squad-bin"
    ok(run_script("prepare_squad.sh", "--raw", DATA / "squad", "--out", data, "--vocab-size", VOCAB,
                  "--workers", "1", "--max-source-tokens", "128"))  # fmt: skip
    return data


def test_xsum_pipeline(tmp_path):
    data, ckpts, out = tmp_path / "xsum-bin", tmp_path / "ckpt", tmp_path / "eval"
    ok(
        run_script(
            "prepare_xsum.sh", "--raw", DATA / "xsum", "--out", data, "--vocab-size", VOCAB, "--workers", "1"
        )
    )
    train = ok(
        run_script(
            "train_xsum.sh",
            "--data",
            data,
            "--save-dir",
            ckpts,
            *TINY_SEQ2SEQ,
            "--max-source-positions",
            "256",
        )
    )
    argv = printed_command(train)
    # the recipe's settings are there, the overrides come after them
    assert argv[argv.index("--criterion") + 1] == "moe_label_smoothed_cross_entropy"
    assert argv[argv.index("--total-num-update") + 1] == "8"  # follows --max-update
    experts = [argv[i + 1] for i, a in enumerate(argv) if a == "--moe-experts"]
    assert experts == ["8", "4"]  # the recipe's 8, then the override (argparse keeps the last)
    assert (ckpts / "checkpoint_best.pt").is_file() and (ckpts / "checkpoint_last.pt").is_file()
    assert not list(ckpts.glob("checkpoint[0-9]*.pt"))

    ev = ok(
        run_script("eval_xsum.sh", "--data", data, "--checkpoint", ckpts / "checkpoint_best.pt", "--out", out)
    )
    gen = printed_command(ev)
    for flag, value in (
        ("--beam", "6"),
        ("--max-len-b", "60"),
        ("--min-len", "10"),
        ("--no-repeat-ngram-size", "3"),
    ):
        assert gen[gen.index(flag) + 1] == value
    assert gen[gen.index("--max-source-positions") + 1] == "256"  # read from the checkpoint
    check_one_hypothesis_per_id(data, out)
    scores = json.loads((out / "rouge.json").read_text())
    assert scores["num_examples"] == len(lines(data / "test.tgt.raw")) == 20
    for key in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= scores[key] <= 100.0
    assert '"rouge1"' in ev.stdout  # printed


def test_squad_pipeline(tmp_path, squad_data):
    data, ckpts, out = squad_data, tmp_path / "ckpt", tmp_path / "eval"
    ok(
        run_script(
            "train_squad.sh",
            "--data",
            data,
            "--save-dir",
            ckpts,
            *TINY_SEQ2SEQ,
            "--max-source-positions",
            "128",
        )
    )
    ev = ok(
        run_script(
            "eval_squad.sh", "--data", data, "--checkpoint", ckpts / "checkpoint_last.pt", "--out", out
        )
    )
    check_one_hypothesis_per_id(data, out)
    scores = json.loads((out / "squad.json").read_text())
    assert scores["num_questions"] == len(lines(data / "test.id")) == 30
    assert scores["num_unanswered"] == 0
    for key in ("exact_match", "f1"):
        assert 0.0 <= scores[key] <= 100.0
    assert scores["exact_match"] <= scores["f1"] + 1e-9
    assert '"exact_match"' in ev.stdout


def test_wikitext_pipeline(tmp_path):
    data, ckpts, out = tmp_path / "wt-bin", tmp_path / "ckpt", tmp_path / "eval"
    ok(
        run_script(
            "prepare_wikitext.sh",
            "--raw",
            DATA / "wikitext-2",
            "--out",
            data,
            "--vocab-size",
            VOCAB,
            "--workers",
            "1",
        )
    )
    ok(run_script("train_wikitext.sh", "--data", data, "--save-dir", ckpts,
                  "--arch", "meo_transformer_lm_tiny", "--max-update", "10", "--max-tokens", "1024",
                  "--update-freq", "1", "--tokens-per-sample", "128", "--moe-experts", "4",
                  "--moe-top-k", "2", "--lr", "5e-3", "--warmup-updates", "2",
                  "--no-epoch-checkpoints"))  # fmt: skip
    ev = ok(run_script("eval_wikitext.sh", "--data", data, "--checkpoint", ckpts / "checkpoint_best.pt",
                       "--out", out, "--context-window", "32"))  # fmt: skip
    scores = json.loads((out / "ppl.json").read_text())
    vocab = len(lines(data / "dict.txt")) + 4  # + <s> <pad> </s> <unk>
    assert math.isfinite(scores["perplexity"]) and 1.0 < scores["perplexity"] < vocab
    assert scores["perplexity"] == pytest.approx(2 ** scores["loss_base2"], rel=1e-6)
    assert scores["num_tokens"] == sum(idx_sizes(data / "test.idx"))  # every token of the split scored
    assert scores["tokens_per_sample"] == 128  # from the checkpoint
    assert scores["context_window"] == 32
    assert '"perplexity"' in ev.stdout


def test_upcycle_from_dense_fairseq_checkpoint(tmp_path, squad_data):
    """A plain fairseq `transformer` of the tiny sizes, upcycled into meo_transformer_tiny."""
    data, dense, ckpts = squad_data, tmp_path / "dense", tmp_path / "ckpt"
    sizes = []
    for side in ("encoder", "decoder"):
        sizes += [f"--{side}-embed-dim", "64", f"--{side}-ffn-embed-dim", "256", f"--{side}-layers", "2",
                  f"--{side}-attention-heads", "4"]  # fmt: skip
    ok(subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(data), "--task", "translation",
         "--source-lang", "src", "--target-lang", "tgt", "--truncate-source", "--arch", "transformer", *sizes,
         "--share-all-embeddings", "--max-source-positions", "128",
         "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam",
         "--lr", "1e-3", "--max-update", "1", "--max-tokens", "1024", "--save-dir", str(dense), "--cpu",
         "--disable-validation", "--no-epoch-checkpoints", "--no-save-optimizer-state"],
        capture_output=True, text=True, env=env(), cwd=str(tmp_path), timeout=300,
    ))  # fmt: skip
    train = ok(run_script("train_squad.sh", "--data", data, "--save-dir", ckpts,
                          "--upcycle-from", dense / "checkpoint_last.pt", *TINY_SEQ2SEQ[:-1],
                          "--max-update", "1", "--max-source-positions", "128",
                          "--disable-validation"))  # fmt: skip
    argv = printed_command(train)
    assert argv[argv.index("--moe-upcycle-from") + 1] == str(dense / "checkpoint_last.pt")
    assert re.search(r"upcycled \d+ expert FFNs", train.stdout + train.stderr)
    assert (ckpts / "checkpoint_last.pt").is_file()


# ------------------------------------------------------------------------------------------------
# Command lines (--dry-run: nothing is trained)
# ------------------------------------------------------------------------------------------------


def parse_train_argv(argv):
    """fairseq's own parsing of a printed `python -m fairseq_cli.train ...` command."""
    from fairseq import options

    i = argv.index("fairseq_cli.train")
    argv = list(argv[i + 1 :])
    if "--user-dir" in argv:  # fairseq refuses a second path (a symlink) to an imported user dir
        j = argv.index("--user-dir") + 1
        argv[j] = os.path.realpath(argv[j])
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, argv)


@pytest.mark.parametrize(
    "script,arch,criterion,extra",
    [
        ("train_xsum.sh", "meo_bart_large", "moe_label_smoothed_cross_entropy",
         {"label_smoothing": 0.1, "lr": [3e-05], "lr_scheduler": "polynomial_decay",
          "total_num_update": 15000, "truncate_source": True, "share_all_embeddings": True}),
        ("train_squad.sh", "meo_transformer", "moe_label_smoothed_cross_entropy",
         {"label_smoothing": 0.1, "truncate_source": True, "share_all_embeddings": True}),
        ("train_wikitext.sh", "meo_transformer_lm_gpt2_small", "moe_cross_entropy",
         {"tokens_per_sample": 512, "sample_break_mode": "none", "share_decoder_input_output_embed": True}),
    ],
)  # fmt: skip
def test_recipe_defaults_parse(tmp_path, script, arch, criterion, extra):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dict.txt", "dict.src.txt", "dict.tgt.txt", "train.idx", "train.bin", "valid.idx",
                 "train.src-tgt.src.idx", "train.src-tgt.tgt.idx", "valid.src-tgt.src.idx"):  # fmt: skip
        (data / name).touch()
    proc = ok(
        run_script(script, "--data", data, "--save-dir", tmp_path / "ck", "--dry-run", MEO_NUM_GPUS="0")
    )
    assert not (tmp_path / "ck").exists()
    args = parse_train_argv(printed_command(proc))
    assert args.arch == arch and args.criterion == criterion and args.cpu
    assert (args.moe_mode, args.moe_experts, args.moe_top_k) == ("meo", 8, 2)
    assert args.user_dir == str(REPO / "meo_fairseq")
    for key, value in extra.items():
        got = getattr(args, key)
        if key == "total_num_update":  # a string in fairseq's Namespace
            got = float(got)
        assert got == value, key
    # extra options come last and override the recipe; --upcycle-from maps to --moe-upcycle-from
    ckpt = tmp_path / "dense.pt"
    ckpt.touch()
    proc = ok(run_script(script, "--data", data, "--save-dir", tmp_path / "ck", "--dry-run",
                         "--upcycle-from", ckpt, "--moe-top-k", "4", "--moe-mode", "moe", "--lr", "1e-4",
                         MEO_NUM_GPUS="0"))  # fmt: skip
    args = parse_train_argv(printed_command(proc))
    assert (args.moe_mode, args.moe_top_k, args.lr) == ("moe", 4, [1e-4])
    assert args.moe_upcycle_from == str(ckpt)


def test_gpu_command_lines(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dict.txt", "train.idx", "train.bin", "valid.idx"):
        (data / name).touch()
    base = ["--data", data, "--save-dir", tmp_path / "ck", "--dry-run"]
    argv = printed_command(ok(run_script("train_wikitext.sh", *base, MEO_NUM_GPUS="4")))
    assert "--cpu" not in argv and "--fp16" in argv
    assert argv[argv.index("--distributed-world-size") + 1] == "4"
    assert argv[:3] == [sys.executable, "-m", "fairseq_cli.train"]  # fairseq spawns one process per GPU
    argv = printed_command(ok(run_script("train_wikitext.sh", *base, MEO_NUM_GPUS="4", MEO_BF16="1")))
    assert "--bf16" in argv and "--fp16" not in argv
    assert argv[:3] == [
        sys.executable,
        "-m",
        "meo_fairseq.train",
    ]  # fairseq-train would take --bf16 for --tpu
    argv = printed_command(ok(run_script("train_wikitext.sh", *base, "--bf16", "--tpu", MEO_NUM_GPUS="0")))
    assert argv[:3] == [sys.executable, "-m", "fairseq_cli.train"]  # a TPU run is fairseq's own
    argv = printed_command(
        ok(run_script("train_wikitext.sh", *base, MEO_NUM_GPUS="2", MEO_LAUNCHER="torchrun"))
    )
    assert argv[:7] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
    ]
    assert argv[7] == "fairseq_cli.train"
    # an explicit precision or --cpu wins
    argv = printed_command(ok(run_script("train_wikitext.sh", *base, "--bf16", MEO_NUM_GPUS="1")))
    assert "--fp16" not in argv and argv.count("--bf16") == 1 and argv[2] == "meo_fairseq.train"
    argv = printed_command(ok(run_script("train_wikitext.sh", *base, "--cpu", MEO_NUM_GPUS="4")))
    assert "--fp16" not in argv and "--distributed-world-size" not in argv


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train_xsum.sh", "train_wikitext.sh", "train_squad.sh",
                                    "eval_xsum.sh", "eval_wikitext.sh", "eval_squad.sh"])  # fmt: skip
def test_help(script):
    proc = ok(run_script(script, "--help"))
    assert proc.stdout.startswith("Usage: scripts/" + script)


def test_bad_arguments(tmp_path):
    missing = tmp_path / "no-such-dir"

    def fails(proc, *needles):
        assert proc.returncode != 0
        for needle in needles:
            assert needle in proc.stderr, (needle, proc.stderr)

    fails(
        run_script("train_xsum.sh", "--data", missing, "--save-dir", tmp_path / "ck"), "--data", str(missing)
    )
    fails(run_script("train_wikitext.sh", "--save-dir", tmp_path / "ck"), "--data DIR is required")
    fails(
        run_script("eval_xsum.sh", "--data", missing, "--checkpoint", "x.pt", "--out", tmp_path / "o"),
        "--data",
        str(missing),
    )
    fails(run_script("eval_squad.sh", "--data"), "--data needs a value")

    squad = tmp_path / "squad"
    squad.mkdir()
    for name in ("dict.src.txt", "dict.tgt.txt", "test.src-tgt.src.idx", "test.id", "dev.answers.jsonl",
                 "train.src-tgt.src.idx", "train.src-tgt.tgt.idx", "valid.src-tgt.src.idx"):  # fmt: skip
        (squad / name).touch()
    ckpt = tmp_path / "nope" / "checkpoint_best.pt"
    fails(
        run_script("eval_squad.sh", "--data", squad, "--checkpoint", ckpt, "--out", tmp_path / "o"),
        "--checkpoint",
        str(ckpt),
    )
    fails(
        run_script("eval_xsum.sh", "--data", squad, "--checkpoint", ckpt, "--out", tmp_path / "o"),
        "missing test.tgt.raw",
    )
    fails(run_script("train_squad.sh", "--data", squad, "--save-dir", tmp_path / "ck",
                     "--upcycle-from", ckpt),
          "--upcycle-from", str(ckpt))  # fmt: skip
    wt = tmp_path / "wt"
    wt.mkdir()
    for name in ("dict.txt", "test.idx", "test.bin"):
        (wt / name).touch()
    fails(
        run_script("eval_wikitext.sh", "--data", wt, "--checkpoint", ckpt, "--out", tmp_path / "o"),
        "--checkpoint",
        str(ckpt),
    )
    fails(run_script("eval_wikitext.sh", "--data", wt, "--checkpoint", ckpt, "--out", tmp_path / "o",
                     "--context-window", "x"),
          "--context-window must be an integer")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------------------
# Every validation / evaluation example is used; torchrun is used when asked for
# ------------------------------------------------------------------------------------------------


def test_recipes_validate_every_example(tmp_path):
    """fairseq drops a final batch smaller than --required-batch-size-multiple (default 8): every
    recipe passes 1, so that validation sees the whole split."""
    for script, files in (
        ("train_wikitext.sh", ("dict.txt", "train.idx", "train.bin", "valid.idx")),
        ("train_squad.sh", ("dict.src.txt", "dict.tgt.txt", "train.src-tgt.src.idx", "train.src-tgt.tgt.idx",
                            "valid.src-tgt.src.idx")),
        ("train_xsum.sh", ("dict.src.txt", "dict.tgt.txt", "train.src-tgt.src.idx", "train.src-tgt.tgt.idx",
                           "valid.src-tgt.src.idx")),
    ):  # fmt: skip
        data = tmp_path / script
        data.mkdir()
        for name in files:
            (data / name).touch()
        proc = run_script(
            script, "--data", data, "--save-dir", tmp_path / "ck", "--dry-run", MEO_NUM_GPUS="0"
        )
        argv = printed_command(ok(proc))
        assert argv[argv.index("--required-batch-size-multiple") + 1] == "1", script


def test_torchrun_with_one_gpu(tmp_path):
    """MEO_LAUNCHER=torchrun launches torchrun with one GPU too (it used to run plain fairseq)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dict.txt", "train.idx", "train.bin", "valid.idx"):
        (data / name).touch()
    base = ["--data", data, "--save-dir", tmp_path / "ck", "--dry-run"]
    proc = run_script("train_wikitext.sh", *base, MEO_NUM_GPUS="1", MEO_LAUNCHER="torchrun")
    argv = printed_command(ok(proc))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m"]
    assert argv[:7] == torchrun
    # fairseq reads torchrun's WORLD_SIZE only when --distributed-world-size > 1
    assert int(argv[argv.index("--distributed-world-size") + 1]) > 1
