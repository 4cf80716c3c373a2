"""``python -m meo_fairseq.options``: the --moe-* options that fairseq's own --help does not show."""

import re
import subprocess
import sys

from cli_utils import REPO, USER_DIR, env
from fairseq import options as fairseq_options


def run_options(*args):
    cmd = [sys.executable, "-m", "meo_fairseq.options", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=env(), cwd=str(REPO), timeout=120
    )


def listed_flags(text):
    return {m.group(1) for m in re.finditer(r"^(--[\w-]+)", text, re.MULTILINE)}


def listed_options(text):
    """(flag, a valid value or None) for every option the listing shows."""
    out = []
    for m in re.finditer(r"^(--[\w-]+)(?: \{([\w,-]+)\}| (INT|FLOAT|STR))?", text, re.MULTILINE):
        value = (
            m.group(2).split(",")[0]
            if m.group(2)
            else {"INT": "2", "FLOAT": "0.5", "STR": "x"}.get(m.group(3))
        )
        out.append((m.group(1), value))
    return out


def test_lists_every_moe_option_of_an_arch():
    from meo_fairseq.models.moe_args import MoEArgs

    every = {"--" + name.replace("_", "-") for name in MoEArgs.__dataclass_fields__ if "moe" in name} | {
        "--moe-gate-noise"
    }
    for arch, task in (("meo_transformer_lm_tiny", ["--task", "language_modeling"]),
                       ("meo_bart_large", ["--task", "translation"])):  # fmt: skip
        proc = run_options("--arch", arch)
        assert proc.returncode == 0, proc.stderr
        assert listed_flags(proc.stdout) >= every, arch
        assert "--moe-top-k INT (default: 4)" in proc.stdout
        # fairseq-train with that --arch accepts every listed option
        argv = ["DATA", "--user-dir", USER_DIR, "--arch", arch, *task]
        for flag, value in listed_options(proc.stdout):
            if flag != "--moe-gate-noise":  # the opposite of --no-moe-gate-noise
                argv += [flag] if value is None else [flag, value]
        args = fairseq_options.parse_args_and_arch(fairseq_options.get_training_parser(), argv)
        assert args.moe_top_k == 2 and args.no_moe_gate_noise is True


def test_every_model_and_bad_arch():
    proc = run_options()
    assert (
        proc.returncode == 0
        and "model meo_transformer " in proc.stdout
        and "model meo_transformer_lm " in proc.stdout
    )
    bad = run_options("--arch", "transformer_lm")
    assert bad.returncode != 0 and "--arch transformer_lm" in bad.stderr
