"""fairseq-train for one rank of tests/test_cli_distributed.py, dumping the model's parameters.

Usage: python tests/dist_train_driver.py OUT_DIR <fairseq-train arguments>

Runs fairseq's own command-line entry point (``fairseq_cli.train.cli_main``) unchanged, with two
hooks: the model's state_dict is saved to OUT_DIR/rank<R>.initial.pt when the Trainer has been
built (before any update) and to OUT_DIR/rank<R>.final.pt when training has finished, so that the
ranks' parameters can be compared (fairseq itself saves checkpoints on rank 0 only).
"""

import os
import sys

import torch


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _dump(model, out_dir: str, tag: str) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"rank{_rank()}.{tag}.pt"))


def main() -> None:
    out_dir, args = sys.argv[1], sys.argv[2:]
    os.makedirs(out_dir, exist_ok=True)

    # isort: off
    from fairseq_cli import train  # first: it sets up fairseq's log format before fairseq is imported
    from fairseq import trainer as trainer_module
    # isort: on

    trainers = []
    orig_init = trainer_module.Trainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        trainers.append(self)
        _dump(self.get_model(), out_dir, "initial")

    trainer_module.Trainer.__init__ = init

    orig_main = train.main

    def main_and_dump(cfg, **kwargs):
        orig_main(cfg, **kwargs)
        _dump(trainers[-1].get_model(), out_dir, "final")

    train.main = main_and_dump  # cli_main passes the module-level `main` to call_main
    sys.argv = ["fairseq-train", *args]
    train.cli_main()


if __name__ == "__main__":
    main()
