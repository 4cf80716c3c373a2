"""``--no-repeat-ngram-size``: the plugin's replacement of fairseq's broken Python fallback.

Without the compiled extension fairseq's fallback compares padding with the hypotheses and blocks
nothing (fairseq issues #5206, #4709). Checked here: the vectorised blocking against a brute-force
reference, fairseq's ``NGramRepeatBlock`` once the plugin is imported, and fairseq-generate with
``--user-dir meo_fairseq``: no 3-gram repeats in any hypothesis (an untrained model repeats itself
without the option, so the check can fail).
"""

import math
import random

import pytest
import torch
from cli_utils import SGD_LR0, USER_DIR, hypotheses, preprocess_seq2seq, run, write_seq2seq_text

from meo_fairseq.ngram import block_repeated_ngrams


def reference_banned(seq, n):
    """Tokens that would complete an n-gram already in seq (a list of ints)."""
    if len(seq) < n:
        return set()
    context = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == context}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_block_repeated_ngrams_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    rows, max_len, vocab = 12, 20, 5  # a small vocabulary: many repeats
    tokens = torch.randint(0, vocab, (rows, max_len + 2), generator=g)
    for step in range(max_len):
        buf = tokens.clone()
        buf[:, step + 1 :] = 1  # padding after the valid columns, as in fairseq's buffer
        lprobs = torch.randn(rows, vocab, generator=g)
        before = lprobs.clone()
        out = block_repeated_ngrams(buf, lprobs, step, n)
        assert out is lprobs  # in place
        for r in range(rows):
            banned = reference_banned(buf[r, : step + 1].tolist(), n)
            for v in range(vocab):
                if v in banned:
                    assert out[r, v] == -math.inf, (step, r, v)
                else:
                    assert out[r, v] == before[r, v], (step, r, v)


def test_fairseq_ngram_block_is_fixed_by_import():
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    import meo_fairseq  # noqa: F401

    blocker = NGramRepeatBlock(3, use_extension=False)
    bsz, beam, step = 1, 2, 5
    tokens = torch.full((bsz * beam, 12), 1)  # padded buffer, longer than the hypotheses
    tokens[:, : step + 1] = torch.tensor([[2, 7, 8, 9, 7, 8], [2, 5, 6, 7, 5, 4]])
    lprobs = torch.zeros(bsz * beam, 10)
    blocker(tokens, lprobs, bsz, beam, step)
    assert lprobs[0, 9] == -math.inf  # "7 8 9" would repeat
    assert torch.isfinite(lprobs[0, torch.arange(10) != 9]).all()
    assert torch.isfinite(lprobs[1]).all()  # context "5 4" was never followed by anything


def repeated_trigrams(text):
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) - len(set(grams))


def test_generate_blocks_repeated_trigrams(tmp_path):
    """fairseq-generate with --user-dir meo_fairseq: no hypothesis repeats a 3-gram."""
    write_seq2seq_text(tmp_path / "text")
    data = preprocess_seq2seq(tmp_path / "text", tmp_path / "bin")
    save = tmp_path / "ckpt"
    run("train", [
        data, "--user-dir", USER_DIR, "--arch", "meo_transformer_tiny", "--task", "translation",
        "--source-lang", "src", "--target-lang", "tgt", "--criterion", "moe_label_smoothed_cross_entropy",
        "--moe-experts", "4", "--moe-top-k", "2", *SGD_LR0, "--max-update", "1", "--max-tokens", "1024",
        "--cpu", "--num-workers", "0", "--seed", "1", "--no-epoch-checkpoints", "--save-dir", save,
    ])  # fmt: skip
    gen = [
        data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt", "--task", "translation",
        "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "test", "--cpu", "--beam", "4",
        "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-len-a", "0", "--max-len-b", "30",
        "--min-len", "30",
    ]  # fmt: skip
    plain = hypotheses(run("generate", gen).stdout)
    blocked = hypotheses(run("generate", [*gen, "--no-repeat-ngram-size", "3"]).stdout)
    assert len(plain) == len(blocked) == 20
    assert sum(repeated_trigrams(t) for _, t in plain.values()) > 0, (
        "the untrained model should repeat itself"
    )
    for i, (_, text) in blocked.items():
        assert len(text.split()) >= 30
        assert repeated_trigrams(text) == 0, (i, text)


def test_blocking_with_random_buffers_of_beam_search_shape():
    """Many rows, as in batched beam search, with a vocabulary where every n-gram recurs."""
    rnd = random.Random(0)
    rows, vocab, n = 64, 3, 2
    seqs = [[rnd.randrange(vocab) for _ in range(16)] for _ in range(rows)]
    tokens = torch.tensor([s + [1] * 6 for s in seqs])
    lprobs = torch.zeros(rows, vocab)
    block_repeated_ngrams(tokens, lprobs, 15, n)
    for r, s in enumerate(seqs):
        assert {v for v in range(vocab) if lprobs[r, v] == -math.inf} == reference_banned(s, n)


def test_ngram_benchmark_runs(capsys):
    from meo_fairseq.benchmark.ngram import main

    main(["--batch-size", "2", "--beam", "2", "--max-len", "8", "--vocab", "50"])
    out = capsys.readouterr().out
    assert "block_repeated_ngrams" in out and "fairseq's Python fallback" in out
