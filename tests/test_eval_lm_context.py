"""fairseq-eval-lm on a plugin LM with a context longer than its training one fails loudly.

fairseq-eval-lm's default --tokens-per-sample is 1024; on a model trained with fewer positions it
used to skip every longer block with one WARNING and report the perplexity of what was left
(issue: "Evaluated 54 tokens" instead of 2,102). Now it stops with an error naming the flag, and
the training value evaluates every token.
"""

import pytest
from cli_utils import LM_COMMON, SGD_LR0, USER_DIR, eval_lm, run, run_many

TPS = 64  # LM_COMMON's --tokens-per-sample


@pytest.fixture(scope="module")
def lm_checkpoint(lm_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("lm_ctx")
    run("train", [
        lm_bin, "--user-dir", USER_DIR, "--arch", "meo_transformer_lm_tiny",
        "--criterion", "moe_cross_entropy",
        "--moe-experts", "4", "--moe-top-k", "2", "--moe-segment-length", "16", *LM_COMMON, *SGD_LR0,
        "--max-update", "1", "--save-dir", save,
    ])  # fmt: skip
    return save / "checkpoint_last.pt"


def eval_args(lm_bin, ckpt, *extra):
    return [lm_bin, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "test", "--cpu",
            "--num-workers", "0", "--max-tokens", "4096", *extra]  # fmt: skip


def test_eval_lm_too_long_context_fails_loudly(lm_bin, lm_checkpoint):
    default, longer, window = run_many([
        ("eval_lm", eval_args(lm_bin, lm_checkpoint)),  # fairseq's default --tokens-per-sample 1024
        ("eval_lm", eval_args(lm_bin, lm_checkpoint, "--tokens-per-sample", 2 * TPS)),
        # a window of 48 tokens before blocks of 80 - 48 = 32: inputs of 80 > 64 positions
        ("eval_lm", eval_args(lm_bin, lm_checkpoint, "--tokens-per-sample", TPS + 16,
                              "--context-window", 48)),
    ])  # fmt: skip
    for res, flag in ((default, 1024), (longer, 2 * TPS), (window, TPS + 16)):
        assert res.returncode != 0, res.describe()
        assert f"--tokens-per-sample {flag}:" in res.log and f"pass --tokens-per-sample {TPS}" in res.log, (
            res.describe()
        )
        assert "Perplexity" not in res.log


def test_eval_lm_training_context_scores_every_token(lm_bin, lm_checkpoint):
    test_tokens = None
    for extra in (["--tokens-per-sample", TPS], ["--tokens-per-sample", TPS, "--context-window", 32]):
        ev = eval_lm(run("eval_lm", eval_args(lm_bin, lm_checkpoint, *extra)).log)
        test_tokens = test_tokens or ev.tokens
        assert ev.tokens == test_tokens > 1000, ev  # every token, with or without a context window
