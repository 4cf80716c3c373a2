"""Read, validate and encode the GLUE tasks' TSV files (the Python half of scripts/prepare_glue.sh).

The layout is that of the standard GLUE download (``glue_data/{CoLA,SST-2,...}/{train,dev,test}.tsv``)
and the columns are those fairseq's ``examples/roberta/preprocess_GLUE_tasks.sh`` reads; the output
is fairseq's ``sentence_prediction`` layout: per split one text file per input (``input0``, and
``input1`` for sentence-pair tasks) and one for the labels. Inputs are encoded with GPT-2 BPE
(``--bpe gpt2``: the ``encoder.json`` / ``vocab.bpe`` of a released RoBERTa, as fairseq's
``multiprocessing_bpe_encoder``) or with sentencepiece (``--bpe spm``: the ``spm.model`` of a model
trained here, or a new one trained on the task's training inputs).

Like prepare.py, it imports neither torch nor fairseq's package (the GPT-2 encoder module is loaded
from fairseq's installation by file) and is run as a file by the shell script.
Bad input raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

try:
    from .prepare import (
        DataError,
        iter_text_lines,
        load_sentencepiece,
        normalize_whitespace,
        train_sentencepiece,
        write_lines,
        write_spm_files,
    )
except ImportError:  # run as a file (python meo_fairseq/data/glue.py ...)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from prepare import (
        DataError,
        iter_text_lines,
        load_sentencepiece,
        normalize_whitespace,
        train_sentencepiece,
        write_lines,
        write_spm_files,
    )


@dataclass(frozen=True)
class GlueTask:
    """Columns (0-based) of one GLUE task's TSV files, as fairseq's preprocessing script reads them."""

    name: str
    inputs: Tuple[int, ...]
    test_inputs: Tuple[int, ...]
    label: int
    num_classes: int  # 1: regression (STS-B)
    dev_splits: Tuple[str, ...] = ("dev",)
    test_splits: Tuple[str, ...] = ("test",)
    dev_label: Optional[int] = None  # MNLI: the dev files' gold_label column
    header: bool = True  # CoLA's train/dev files have no header line (its test file has one)
    fields: Optional[int] = None  # QQP: rows with another number of fields are dropped (as fairseq)
    metric: str = "accuracy"


TASKS: Dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("CoLA", (3,), (1,), 1, 2, header=False, metric="mcc"),
        GlueTask("SST-2", (0,), (1,), 1, 2),
        GlueTask("MRPC", (3, 4), (3, 4), 0, 2, metric="f1"),
        GlueTask("QQP", (3, 4), (1, 2), 5, 2, fields=6, metric="f1"),
        GlueTask("STS-B", (7, 8), (7, 8), 9, 1, metric="pearson"),
        GlueTask(
            "MNLI",
            (8, 9),
            (8, 9),
            11,
            3,
            dev_splits=("dev_matched", "dev_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
            dev_label=15,
        ),
        GlueTask("QNLI", (1, 2), (1, 2), 3, 2),
        GlueTask("RTE", (1, 2), (1, 2), 3, 2),
        GlueTask("WNLI", (1, 2), (1, 2), 3, 2),
    )
}


def task_by_name(name: str) -> GlueTask:
    """The task for ``name`` (case and '-' insensitive: ``sst2``, ``STS-B``); ValueError listing the
    valid names otherwise."""
    key = name.replace("-", "").lower()
    for t in TASKS.values():
        if t.name.replace("-", "").lower() == key:
            return t
    raise ValueError(f"unknown GLUE task {name!r}; valid names: {', '.join(TASKS)}")


def fairseq_splits(task: GlueTask) -> List[Tuple[str, str, bool]]:
    """(GLUE file stem, fairseq split name, has labels) for every split, test splits last.

    fairseq's names: dev -> valid (MNLI: dev_matched -> valid, dev_mismatched -> valid1), test ->
    test (MNLI: test_matched -> test, test_mismatched -> test1).
    """
    out = [("train", "train", True)]
    out += [(s, "valid" if i == 0 else f"valid{i}", True) for i, s in enumerate(task.dev_splits)]
    out += [(s, "test" if i == 0 else f"test{i}", False) for i, s in enumerate(task.test_splits)]
    return out


def input_files(glue_dir: str, task: GlueTask) -> List[str]:
    """The task's TSV files that exist (train and dev must; test files are optional)."""
    folder = os.path.join(glue_dir, task.name)
    files = []
    for stem, _, labelled in fairseq_splits(task):
        path = os.path.join(folder, f"{stem}.tsv")
        if os.path.exists(path):
            files.append(path)
        elif labelled:
            raise DataError(path, f"file not found (the {task.name} {stem} split of the GLUE download)")
    return files


def read_split(
    path: str, task: GlueTask, labelled: bool, dev: bool
) -> Tuple[List[List[str]], List[str], int]:
    """Inputs (one list per input column) and labels of one TSV file; the number of dropped rows.

    Every row must have the columns the task reads, non-empty inputs and a label (a number for
    STS-B); otherwise DataError names the file and line. QQP rows with another number of fields
    are dropped, as fairseq's script drops them.
    """
    cols = task.inputs if labelled else task.test_inputs
    label_col = (task.dev_label if (dev and task.dev_label is not None) else task.label) if labelled else None
    need = max(cols + ((label_col,) if label_col is not None else ()))
    inputs: List[List[str]] = [[] for _ in cols]
    labels: List[str] = []
    dropped = 0
    skip_header = task.header or not labelled
    for lineno, line in iter_text_lines(path):
        if lineno == 1 and skip_header:
            continue
        if not line.strip():
            continue
        row = line.split("\t")
        if task.fields is not None and labelled and len(row) != task.fields:
            dropped += 1
            continue
        if len(row) <= need:
            raise DataError(
                path, f"{len(row)} tab-separated fields, {task.name} needs at least {need + 1}", lineno
            )
        for out, c in zip(inputs, cols):
            text = normalize_whitespace(row[c])
            if not text:
                raise DataError(path, f"empty input in column {c + 1}", lineno)
            out.append(text)
        if label_col is not None:
            label = row[label_col].strip()
            if not label or len(label.split()) != 1:
                raise DataError(path, f"bad label {row[label_col]!r} in column {label_col + 1}", lineno)
            if task.num_classes == 1:
                try:
                    float(label)
                except ValueError:
                    raise DataError(
                        path, f"label {label!r} in column {label_col + 1} is not a number", lineno
                    ) from None
            labels.append(label)
    if not inputs[0]:
        raise DataError(path, "no examples")
    return inputs, labels, dropped


def _gpt2_encoder(encoder_json: str, vocab_bpe: str):
    """fairseq's GPT-2 BPE encoder (gpt2_bpe_utils, loaded by file: no fairseq/torch import)."""
    for path in (encoder_json, vocab_bpe):
        if not os.path.isfile(path):
            raise DataError(path, "file not found")
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fairseq is not installed (needed for its GPT-2 BPE)")
    src = os.path.join(list(spec.submodule_search_locations)[0], "data", "encoders", "gpt2_bpe_utils.py")
    mod_spec = importlib.util.spec_from_file_location("_gpt2_bpe_utils", src)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    try:
        return mod.get_encoder(encoder_json, vocab_bpe)
    except (ValueError, json.JSONDecodeError, IndexError) as e:
        raise DataError(encoder_json, f"cannot read the GPT-2 BPE files ({e})") from None


def prepare_glue(
    glue_dir: str,
    task_name: str,
    text_dir: str,
    out_dir: str,
    bpe: str,
    spm_model: Optional[str] = None,
    vocab_size: int = 8000,
    encoder_json: Optional[str] = None,
    vocab_bpe: Optional[str] = None,
    workers: int = 1,
) -> None:
    """Write ``text_dir/{split}.input{i}`` (encoded), ``text_dir/{split}.label`` (STS-B: score / 5)
    and, for ``--bpe spm`` without a model, ``out_dir/spm.model`` + ``text_dir/dict.txt``; also
    ``out_dir/splits.txt`` (``fairseq_split glue_file examples`` lines)."""
    task = task_by_name(task_name)
    files = {os.path.basename(f)[: -len(".tsv")]: f for f in input_files(glue_dir, task)}
    data = {}
    for stem, split, labelled in fairseq_splits(task):
        if stem not in files:
            continue
        inputs, labels, dropped = read_split(files[stem], task, labelled, dev=split.startswith("valid"))
        if dropped:
            print(
                f"[prepare_glue] {files[stem]}: dropped {dropped} rows without {task.fields} fields "
                "(as fairseq)",
                file=sys.stderr,
            )
        data[split] = (stem, inputs, labels)
    if bpe == "gpt2":
        enc = _gpt2_encoder(encoder_json, vocab_bpe)

        def encode(texts):
            return [" ".join(map(str, enc.encode(t))) for t in texts]
    elif bpe == "spm":
        if spm_model:
            if not os.path.isfile(spm_model):
                raise DataError(spm_model, "file not found")
            try:
                sp = load_sentencepiece(spm_model)
            except (RuntimeError, OSError) as e:
                raise DataError(spm_model, f"not a sentencepiece model ({e})") from None
        else:
            texts = [t for col in data["train"][1] for t in col]
            proto = train_sentencepiece(texts, vocab_size)
            write_spm_files(proto, out_dir, os.path.join(text_dir, "dict.txt"))
            sp = load_sentencepiece(proto)

        def encode(texts):
            return [" ".join(p) for p in sp.encode(list(texts), out_type=str, num_threads=max(1, workers))]
    else:
        raise ValueError(f"--bpe must be gpt2 or spm, got {bpe!r}")
    summary = []
    for split, (stem, inputs, labels) in data.items():
        for i, col in enumerate(inputs):
            write_lines(os.path.join(text_dir, f"{split}.input{i}"), encode(col))
        if labels and task.num_classes == 1:  # STS-B: scores 0..5 scaled to 0..1, as fairseq does
            labels = [format(float(x) / 5.0, ".6g") for x in labels]
        if labels:
            write_lines(os.path.join(text_dir, f"{split}.label"), labels)
        summary.append(f"{split} {stem} {len(inputs[0])}")
    write_lines(os.path.join(out_dir, "splits.txt"), summary)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="glue.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tasks", help="print the valid task names, one a line")
    info = sub.add_parser("task-info", help="print NAME NUM_CLASSES INPUTS METRIC for a task name")
    info.add_argument("task")
    ls = sub.add_parser("input-files", help="print the task's TSV files, one a line")
    ls.add_argument("task")
    ls.add_argument("--glue-dir", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("task")
    pr.add_argument("--glue-dir", required=True)
    pr.add_argument("--text-dir", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--bpe", choices=["gpt2", "spm"], required=True)
    pr.add_argument("--spm-model")
    pr.add_argument("--vocab-size", type=int, default=8000)
    pr.add_argument("--encoder-json")
    pr.add_argument("--vocab-bpe")
    pr.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    try:
        if args.cmd == "tasks":
            print("\n".join(TASKS))
        elif args.cmd == "task-info":
            t = task_by_name(args.task)
            print(t.name, t.num_classes, len(t.inputs), t.metric)
        elif args.cmd == "input-files":
            print("\n".join(input_files(args.glue_dir, task_by_name(args.task))))
        else:
            prepare_glue(
                args.glue_dir,
                args.task,
                args.text_dir,
                args.out,
                args.bpe,
                args.spm_model,
                args.vocab_size,
                args.encoder_json,
                args.vocab_bpe,
                args.workers,
            )
    except (DataError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
