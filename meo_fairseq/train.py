"""``python -m meo_fairseq.train``: fairseq-train, with ``--bf16`` on GPUs and CPUs.

fairseq's option parser turns ``--bf16`` (and ``--memory-efficient-bf16``) into ``--tpu``
(``fairseq/options.py``; fairseq issue #4696), so ``fairseq-train --bf16`` on a GPU fails
looking for torch_xla. This entry point parses the same options with fairseq's own parser,
gives ``--tpu`` back its own meaning (set only where the command line says ``--tpu``), and runs
fairseq's own training (``fairseq_cli.train.main`` through ``distributed_utils.call_main``, so
spawning, torchrun and several GPUs work as with fairseq-train). Everything else is
fairseq-train's: the same options, logs and checkpoints. Without ``--bf16`` it is exactly
fairseq-train. The train scripts use it when the command asks for bfloat16.
"""

import logging
import os
import sys
from typing import List, Optional


def cli_main(argv: Optional[List[str]] = None) -> None:
    # fairseq-train's log format (its basicConfig is a no-op once importing fairseq has logged)
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
        force=True,
    )
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = options.get_training_parser()
    if {"--bf16", "--memory-efficient-bf16"} & set(argv) and {"--fp16", "--memory-efficient-fp16"} & set(
        argv
    ):
        parser.error("--bf16 and --fp16 exclude each other")  # (fairseq would say "--fp16 and --tpu")
    args = options.parse_args_and_arch(parser, input_args=argv)
    if args.use_plasma_view or args.profile:
        parser.error("--use-plasma-view and --profile are not supported here: use fairseq-train")
    if args.bf16 and "--tpu" not in argv:  # undo fairseq's "--bf16 implies --tpu"
        args.tpu = False
    cfg = convert_namespace_to_omegaconf(args)
    distributed_utils.call_main(cfg, train.main)


if __name__ == "__main__":
    cli_main()
