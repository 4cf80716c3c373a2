"""Every command block of README.md and examples/*/README.md does what its text says.

Each ```bash and ```python block is listed in BLOCKS below (by file and a line it contains) with how
it is checked; a block that is not listed fails `test_every_block_is_checked`, so a new or edited
command cannot go unchecked. The kinds:

* ``run``: run as written by bash (python blocks by python), from a scratch directory that mirrors
  the checkout (``scripts/``, ``tests/``, ``examples/``, ``meo_fairseq/`` linked), with this
  virtualenv's ``bin/`` first on PATH.
* ``smoke``: a smoke-test block, run as written except that ``/tmp/`` becomes the scratch
  directory's ``tmp/`` (the only substitution of data paths). Their outputs then stand in for the
  full data sets and trained models that the other blocks name: ``data-bin/xsum`` is the bundled
  XSum-format sample prepared by the XSum smoke test and ``checkpoints/xsum-meo`` its tiny model;
  ``data-bin/squad`` and ``checkpoints/squad-meo`` likewise; ``data-bin/wikitext-103``,
  ``data-bin/wikitext-2`` and ``checkpoints/wt103-meo`` the WikiText smoke test's. So the
  evaluation blocks and the steps by hand run as written, on the bundled data.
* ``dry-run``: training commands of full-size recipes (BART-large, GPT-2 sizes: too large for a
  test) run as written with ``--dry-run`` added to each ``scripts/train_*.sh`` call (the only
  substitution of update counts: none are run). The script checks its arguments and prints the
  fairseq-train command, which fairseq's own parser must then accept.
* ``skip``: needs what a test cannot have (the network, full data sets, GPUs, pretrained BART, a
  fresh machine); the reason is given.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from cli_utils import WORKERS
from test_recipes import parse_train_argv

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/*/README.md"))]

NEEDS_NETWORK = "downloads the data or a model (no network in tests)"
FULL_DATA = "needs the full data set or a full-size dense checkpoint (upcycling is tested in test_recipes.py)"
GPUS = "launches on GPUs"
GLUE_DATA = (
    "needs the GLUE download and roberta.base (no network in tests); the QNLI-sample block runs these scripts"
)
SETUP = "sets up an environment (.ci/run runs the test command itself)"

# (file, a piece of the block's text; "\n" matches its start and end too) -> kind or ("skip", reason).
# Within a file, smoke blocks run first, then the others in their order in the file.
BLOCKS = {
    ("README.md", "bash scripts/run_tests.sh"): ("skip", SETUP),
    ("README.md", "pip install --no-deps ve-fairseq==0.12.3"): ("skip", SETUP),
    ("README.md", "scripts/prepare_wikitext.sh --raw tests/data/wikitext-2"): "run",
    ("README.md", "--model-overrides \"{'moe_mode': 'moe'}\""): "run",
    ("README.md", "torchrun --nproc_per_node 8"): ("skip", GPUS),
    ("README.md", "from meo_fairseq.modules import MoEConfig, MoEFFN"): "run",
    ("examples/xsum/README.md", "scripts/prepare_xsum.sh --out data-bin/xsum"): ("skip", NEEDS_NETWORK),
    ("examples/xsum/README.md",
     "\nscripts/train_xsum.sh --data data-bin/xsum --save-dir checkpoints/xsum-meo\n"): "dry-run",
    ("examples/xsum/README.md", "--save-dir checkpoints/xsum-moe --moe-mode moe"): "dry-run",
    ("examples/xsum/README.md", "scripts/eval_xsum.sh --data data-bin/xsum --checkpoint"): "run",
    ("examples/xsum/README.md", "mkdir -p results/xsum-meo"): "run",
    ("examples/xsum/README.md", "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"): "dry-run",
    ("examples/xsum/README.md", "MEO_LAUNCHER=torchrun \\"): "dry-run",
    ("examples/xsum/README.md", "wget https://dl.fbaipublicfiles.com"): ("skip", NEEDS_NETWORK),
    ("examples/xsum/README.md", "scripts/prepare_xsum.sh --raw tests/data/xsum"): "smoke",
    ("examples/wikitext/README.md", "scripts/prepare_wikitext.sh --out data-bin/wikitext-103"):
        ("skip", NEEDS_NETWORK),
    ("examples/wikitext/README.md",
     "\nscripts/train_wikitext.sh --data data-bin/wikitext-103 --save-dir checkpoints/wt103-meo\n"):
        "dry-run",
    ("examples/wikitext/README.md", "--save-dir checkpoints/wt103-moe --moe-mode moe"): "dry-run",
    ("examples/wikitext/README.md", "--save-dir checkpoints/wt103-meo-768"): "dry-run",
    ("examples/wikitext/README.md", "--save-dir checkpoints/wt2-meo"): "dry-run",
    ("examples/wikitext/README.md", "--out results/wt103-meo-cw400 --context-window 400"): "run",
    ("examples/wikitext/README.md", "python -m fairseq_cli.eval_lm data-bin/wikitext-103"): "run",
    ("examples/wikitext/README.md", "CUDA_VISIBLE_DEVICES=0,1,2,3 scripts/train_wikitext.sh"): "dry-run",
    ("examples/wikitext/README.md", "--save-dir checkpoints/wt103-meo-up"): ("skip", FULL_DATA),
    ("examples/wikitext/README.md", "scripts/prepare_wikitext.sh --raw tests/data/wikitext-2"): "smoke",
    ("examples/squad/README.md", "scripts/prepare_squad.sh --out data-bin/squad"): ("skip", NEEDS_NETWORK),
    ("examples/squad/README.md",
     "\nscripts/train_squad.sh --data data-bin/squad --save-dir checkpoints/squad-meo\n"): "dry-run",
    ("examples/squad/README.md", "--save-dir checkpoints/squad-meo-k8 --moe-top-k 8"): "dry-run",
    ("examples/squad/README.md", "scripts/eval_squad.sh --data data-bin/squad --checkpoint"): "run",
    ("examples/squad/README.md", "mkdir -p results/squad-meo"): "run",
    ("examples/squad/README.md", "CUDA_VISIBLE_DEVICES=0,1,2,3 scripts/train_squad.sh"): "dry-run",
    ("examples/squad/README.md", "--save-dir checkpoints/squad-meo-up"): ("skip", FULL_DATA),
    ("examples/squad/README.md", "scripts/prepare_squad.sh --raw tests/data/squad"): "smoke",
    ("examples/glue/README.md", "scripts/prepare_glue.sh --task RTE --glue-dir glue_data"):
        ("skip", NEEDS_NETWORK),
    ("examples/glue/README.md", "--save-dir checkpoints/rte-meo-token"): ("skip", GLUE_DATA),
    ("examples/glue/README.md", "scripts/eval_glue.sh --task RTE"): ("skip", GLUE_DATA),
    # the QNLI-sample pipeline, shortened: one seed and one epoch (validated and saved) instead of five
    ("examples/glue/README.md", "--out data-bin/qnli-sample"): (
        "shortened",
        [
            ("for seed in 1 2 3 4 5; do", "for seed in 1; do"),
            ("--epochs 5", "--epochs 1"),
            ("--validate-interval 5 --save-interval 5", "--validate-interval 1 --save-interval 1"),
        ],
    ),
}  # fmt: skip

# what the smoke tests' outputs stand for (scratch path -> the smoke output it links to)
STAND_INS = {
    "data-bin/xsum": "tmp/xsum-bin", "checkpoints/xsum-meo": "tmp/xsum-ckpt",
    "data-bin/squad": "tmp/squad-bin", "checkpoints/squad-meo": "tmp/squad-ckpt",
    "data-bin/wikitext-103": "tmp/wt-bin", "data-bin/wikitext-2": "tmp/wt-bin",
    "checkpoints/wt103-meo": "tmp/wt-ckpt",
}  # fmt: skip


def blocks(doc):
    """[(language, text)] of the fenced code blocks of a markdown file (indented fences too)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).split("\n"))
        out.append((m.group(2), body))
    return out


def command_blocks(doc):
    return [(lang, body) for lang, body in blocks(doc) if lang in ("bash", "python")]


def kind_of(doc, body):
    kinds = [kind for (d, needle), kind in BLOCKS.items() if d == doc and needle in f"\n{body}\n"]
    assert len(kinds) == 1, f"{doc}: {len(kinds)} BLOCKS entries match this block (need exactly 1):\n{body}"
    return kinds[0]


def test_every_block_is_checked():
    seen = set()
    for doc in DOCS:
        for _, body in command_blocks(doc):
            kind_of(doc, body)
            seen.update((d, n) for (d, n) in BLOCKS if d == doc and n in f"\n{body}\n")
    assert set(BLOCKS) == seen, f"BLOCKS entries that match no block: {set(BLOCKS) - seen}"
    assert "bash scripts/run_tests.sh" in (REPO / "README.md").read_text(encoding="utf-8")


# ---- running them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for name in ("scripts", "tests", "examples", "meo_fairseq"):
        (root / name).symlink_to(REPO / name)
    (root / "tmp").mkdir()
    for link in ("data-bin", "checkpoints"):
        (root / link).mkdir()
    for path, target in STAND_INS.items():
        (root / path).symlink_to(root / target, target_is_directory=True)
    return root


def shell_env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MEO_NUM_GPUS="0")
    for key in ("MEO_BF16", "MEO_LAUNCHER", "MEO_TORCHRUN_ARGS", "MEO_BF16_SUPPORTED"):
        env.pop(key, None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def logical_lines(body):
    """The block's commands with their backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", body)


def run_block(lang, body, cwd, timeout=600):
    if lang == "python":
        cmd = [sys.executable, "-"]
    else:
        cmd = ["bash", "-euo", "pipefail", "-s"]
    proc = subprocess.run(cmd, input=body, cwd=cwd, env=shell_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    assert proc.returncode == 0, (
        f"exit {proc.returncode} of\n{body}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


def dry_run(body, cwd):
    """Adds --dry-run to every scripts/train_*.sh call; returns the fairseq commands they print."""
    lines = []
    for line in logical_lines(body).split("\n"):
        if re.search(r"scripts/train_\w+\.sh", line) and not line.lstrip().startswith("#"):
            line += " --dry-run"
        lines.append(line)
    proc = run_block("bash", "\n".join(lines), cwd)
    printed = re.findall(r"^\[train_\w+\.sh\] command: (.*)$", proc.stderr, re.MULTILINE)
    assert len(printed) == sum("--dry-run" in line for line in lines), proc.stderr
    return printed


def run_doc(doc, scratch):
    """Runs (or dry-runs) the blocks of one file, smoke tests first; returns how many ran."""
    import shlex

    todo = command_blocks(doc)
    todo.sort(key=lambda b: kind_of(doc, b[1]) != "smoke")  # smoke tests first (stable sort)
    ran = 0
    for lang, body in todo:
        kind = kind_of(doc, body)
        if kind == "smoke":
            run_block(lang, body.replace("/tmp/", f"{scratch}/tmp/"), scratch)
        elif kind == "run":
            proc = run_block(lang, body, scratch)
            check_block(body, proc.stdout + proc.stderr)
        elif isinstance(kind, tuple) and kind[0] == "shortened":  # documented substitutions only
            for text, shorter in kind[1]:
                assert text in body, (doc, text)
                body = body.replace(text, shorter)
            proc = run_block(lang, body, scratch)
            check_block(body, proc.stdout + proc.stderr)
        elif kind == "dry-run":
            for command in dry_run(body, scratch):
                args = parse_train_argv(shlex.split(command))
                assert args.user_dir.endswith("meo_fairseq") and args.moe_mode in ("dense", "moe", "meo")
        else:
            continue
        ran += 1
    return ran


@pytest.fixture(scope="module")
def doc_runs(scratch):
    """doc -> (blocks run, exception or None); the files run side by side (they write apart)."""
    order = sorted(DOCS, key=lambda d: -len(command_blocks(d)))  # the longest first
    with ThreadPoolExecutor(max_workers=WORKERS) as ex:
        futures = {doc: ex.submit(run_doc, doc, scratch) for doc in order}
        wait(futures.values())
    return {doc: (f.result() if f.exception() is None else 0, f.exception()) for doc, f in futures.items()}


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands(doc, scratch, doc_runs):
    ran, error = doc_runs[doc]
    if error is not None:
        raise error
    assert ran > 0
    check_outputs(doc, scratch)


def check_block(body, log):
    """What a block's own output must show."""
    assert "Please install tensorboardX" not in log  # fairseq's --tensorboard-logdir works
    if "fairseq-train" in body:  # the validation set is not empty (every block validated)
        valid = re.findall(r"valid on 'valid' subset \| loss (\S+)", log)
        assert valid and all(v != "nan" for v in valid), log[-3000:]
    if "fairseq-eval-lm" in body or "fairseq_cli.eval_lm" in body:
        evaluated = [int(n.replace(",", "")) for n in re.findall(r"Evaluated ([\d,]+) tokens", log)]
        assert evaluated and len(set(evaluated)) == 1 and evaluated[0] > 1000, evaluated  # every token


def check_outputs(doc, root):
    """What the blocks promise, on the bundled data."""
    import json

    if doc == "README.md":
        assert (root / "checkpoints/wt2-sample-meo/checkpoint_best.pt").is_file()
    elif doc == "examples/xsum/README.md":
        for out in ("results/xsum-meo", "tmp/xsum-eval"):
            assert len((root / out / "hyp.txt").read_text(encoding="utf-8").split("\n")[:-1]) == 20, out
            generated = (root / out / "generate-test.txt").read_text(encoding="utf-8")
            hyps = re.findall(r"^H-\d+\t\S+\t(.*)$", generated, re.MULTILINE)
            assert len(hyps) == 20, out  # every test document decoded
            for line in hyps:  # --no-repeat-ngram-size 3: no 3-gram of pieces twice
                pieces = line.split()
                grams = [tuple(pieces[i : i + 3]) for i in range(len(pieces) - 2)]
                assert len(grams) == len(set(grams)), line
        assert json.loads((root / "results/xsum-meo/rouge.json").read_text())["num_examples"] == 20
    elif doc == "examples/glue/README.md":
        scores = json.loads((root / "eval/qnli-1/glue.json").read_text())
        # every dev pair of the QNLI sample scored (accuracy itself is checked in test_glue.py)
        assert scores["task"] == "QNLI" and scores["examples"] == 200 and 0 <= scores["accuracy"] <= 100, (
            scores
        )
    elif doc == "examples/squad/README.md":
        for out in ("results/squad-meo", "tmp/squad-eval"):
            assert json.loads((root / out / "squad.json").read_text())["num_questions"] == 30, out
    elif doc == "examples/wikitext/README.md":
        a = json.loads((root / "results/wt103-meo/ppl.json").read_text())
        b = json.loads((root / "tmp/wt-eval/ppl.json").read_text())
        assert a["num_tokens"] == b["num_tokens"] > 1000  # every test token, with and without a window
