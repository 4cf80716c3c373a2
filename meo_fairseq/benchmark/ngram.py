"""Cost of ``--no-repeat-ngram-size`` per decoding step: fairseq's Python fallback (which blocks
nothing) against the plugin's :func:`meo_fairseq.ngram.block_repeated_ngrams`.

    python -m meo_fairseq.benchmark.ngram --batch-size 32 --beam 6 --vocab 32000
"""

import torch

from meo_fairseq.ngram import block_repeated_ngrams, install


def main(argv=None) -> None:
    """Time one blocking call per decoding step of a beam search: fairseq's Python fallback
    against :func:`block_repeated_ngrams`, and a decoding step's log-softmax over the vocabulary
    for scale."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m meo_fairseq.benchmark.ngram", description=main.__doc__)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam", type=int, default=6)
    p.add_argument("--max-len", type=int, default=60)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    rows = a.batch_size * a.beam
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, a.vocab, (rows, a.max_len + 2), generator=g).to(a.device)
    logits = torch.randn(rows, a.vocab, generator=g).to(a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    install()
    blocker = NGramRepeatBlock(a.ngram, use_extension=False)

    def fairseq_original(tokens, lprobs, step):
        return blocker.fairseq_no_repeat_ngram(tokens, lprobs, a.batch_size, a.beam, step)

    cases = {
        "log_softmax (a decoding step's output layer, for scale)": lambda t, lp, s: torch.log_softmax(lp, -1),
        "fairseq's Python fallback (blocks nothing)": fairseq_original,
        "meo_fairseq.ngram.block_repeated_ngrams": lambda t, lp, s: block_repeated_ngrams(t, lp, s, a.ngram),
    }
    print(
        f"{rows} hypotheses ({a.batch_size} x beam {a.beam}), {a.max_len} steps, vocabulary {a.vocab}, "
        f"{a.ngram}-grams, {a.device}: milliseconds per decoding step (median of 3 searches)"
    )
    for name, fn in cases.items():
        runs = []
        for _ in range(3):
            lprobs = logits.clone()  # changed in place, as in fairseq's search
            sync()
            t0 = time.perf_counter()
            for step in range(a.max_len):
                fn(tokens, lprobs, step)
            sync()
            runs.append((time.perf_counter() - t0) * 1e3 / a.max_len)
        print(f"  {sorted(runs)[1]:8.3f}  {name}")


if __name__ == "__main__":
    main()
