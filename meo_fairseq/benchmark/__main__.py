"""``python -m meo_fairseq.benchmark {flops,layers,model,quality} [options]`` (``-h`` on each for options)."""

import sys

USAGE = """usage: python -m meo_fairseq.benchmark {flops,layers,model,quality} [options]

  flops   FLOPs of BERT-like MLMs with dense / vanilla MoE / MEO FFNs (FlopCounterMode),
          and the FLOPs-vs-k figure (--sweep)
  layers  time and peak memory of one expert FFN, forward and forward+backward, vs dense
  model   fairseq-train words/s and fairseq-generate sentences/s, dense vs MoE vs MEO
  quality validation perplexity of dense / MoE / MEO LMs, from scratch and upcycled (seeds)

Run a command with -h for its options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "flops":
        from . import flops as mod
    elif cmd == "layers":
        from . import layers as mod
    elif cmd == "model":
        from . import model as mod
    elif cmd == "quality":
        from . import quality as mod
    else:
        print(f"unknown benchmark {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return mod.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
