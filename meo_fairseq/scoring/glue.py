"""GLUE metrics (scikit-learn / scipy) and predictions of a fine-tuned sentence_prediction model.

Metrics per task, as GLUE reports them (percentages): accuracy; MRPC and QQP: F1 (positive class
"1") and accuracy; CoLA: Matthews correlation (and accuracy); STS-B: Pearson and Spearman
correlation. MNLI's valid1 subset (dev_mismatched) is scored like valid.

Command line (scripts/eval_glue.sh):
    python -m meo_fairseq.scoring.glue predict --task T --data DIR --checkpoint PT --out DIR
        [--subset valid] [--batch-size 32] [--cpu]
    python -m meo_fairseq.scoring.glue score --task T --pred FILE --gold FILE [--out JSON]
``predict`` writes OUT/pred.SUBSET.txt, OUT/gold.SUBSET.txt (labels as in the TSV files; STS-B:
scores / 5, as trained) and OUT/glue.json; ``score`` scores two such files. Output is JSON.
"""

import argparse
import math
import os
import sys
from typing import Dict, List, Sequence, Union

from ._io import read_lines, report

TASKS = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI")
Label = Union[str, float]


def canonical_task(name: str) -> str:
    """The GLUE task name for ``name`` (case and '-' insensitive); ValueError listing the valid ones."""
    key = name.replace("-", "").lower()
    for t in TASKS:
        if t.replace("-", "").lower() == key:
            return t
    raise ValueError(f"unknown GLUE task {name!r}; valid names: {', '.join(TASKS)}")


def glue_metrics(task: str, pred: Sequence[Label], gold: Sequence[Label]) -> Dict[str, float]:
    """The task's metrics, percentages rounded to 0.01.

    Args:
        task: a GLUE task name.
        pred, gold: labels (strings; STS-B: numbers), one per example, the same length.
    Returns:
        {"accuracy": ...} plus "f1" (MRPC, QQP), "mcc" (CoLA); STS-B: {"pearson", "spearman"};
        always "examples".
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = canonical_task(task)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    if not gold:
        raise ValueError("no examples to score")
    out: Dict[str, float] = {"examples": len(gold)}
    if task == "STS-B":
        from scipy.stats import pearsonr, spearmanr

        p, g = [float(x) for x in pred], [float(x) for x in gold]
        out["pearson"] = round(100 * float(pearsonr(p, g)[0]), 2)
        out["spearman"] = round(100 * float(spearmanr(p, g)[0]), 2)
        return out
    p, g = [str(x) for x in pred], [str(x) for x in gold]
    out["accuracy"] = round(100 * float(accuracy_score(g, p)), 2)
    if task in ("MRPC", "QQP"):
        out["f1"] = round(100 * float(f1_score(g, p, pos_label="1")), 2)
    if task == "CoLA":
        out["mcc"] = round(100 * float(matthews_corrcoef(g, p)), 2)
    return out


def predict(data: str, checkpoint: str, subset: str = "valid", batch_size: int = 32, cpu: bool = False):
    """Predictions and gold labels of a fine-tuned checkpoint on ``subset`` of ``data``.

    Returns:
        (pred, gold): lists of label strings (classification: the label dictionary's symbols) or
        floats (regression), in the subset's order.
    """
    import torch
    from fairseq import checkpoint_utils, utils

    import meo_fairseq  # registers the plugin's models and criteria

    user_dir = os.path.dirname(os.path.abspath(meo_fairseq.__file__))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data, "user_dir": user_dir}
    )
    if cfg.task._name != "sentence_prediction":
        raise ValueError(f"{checkpoint}: trained for task {cfg.task._name!r}, not sentence_prediction")
    model = models[0]
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        model.cuda()
    model.eval()
    head = (
        cfg.criterion.get("classification_head_name", "sentence_classification_head")
        if cfg.criterion
        else None
    )
    head = head or "sentence_classification_head"
    regression = bool(cfg.task.regression_target)
    task.load_dataset(subset, combine=False, epoch=1)
    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset=dataset,
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    ids: List[int] = []
    preds: List[Label] = []
    golds: List[Label] = []
    ldict = task.label_dictionary
    with torch.no_grad():
        for sample in itr:
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=head)
            target = sample["target"].view(-1)
            ids += sample["id"].tolist()
            if regression:
                preds += logits.view(-1).float().tolist()
                golds += target.float().tolist()
            else:
                preds += [ldict[i + ldict.nspecial] for i in logits.argmax(-1).tolist()]
                golds += [ldict[i + ldict.nspecial] for i in target.tolist()]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if [ids[i] for i in order] != list(range(len(dataset))):
        raise RuntimeError(f"{subset}: predicted {len(ids)} of {len(dataset)} examples")
    return [preds[i] for i in order], [golds[i] for i in order]


def _fmt(x: Label) -> str:
    return format(x, ".6g") if isinstance(x, float) else x


def _read_labels(path: str, task: str) -> List[Label]:
    lines = read_lines(path)
    if task != "STS-B":
        return lines
    try:
        return [float(x) for x in lines]
    except ValueError as e:
        raise ValueError(f"{path}: not a number ({e})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.scoring.glue", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict")
    pr.add_argument("--task", required=True)
    pr.add_argument("--data", required=True)
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--subset", default="valid")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--cpu", action="store_true")
    sc = sub.add_parser("score")
    sc.add_argument("--task", required=True)
    sc.add_argument("--pred", required=True)
    sc.add_argument("--gold", required=True)
    sc.add_argument("--out")
    args = p.parse_args(argv)
    try:
        task = canonical_task(args.task)
        if args.cmd == "score":
            scores = glue_metrics(task, _read_labels(args.pred, task), _read_labels(args.gold, task))
            return report({"task": task, **scores}, args.out)
        pred, gold = predict(args.data, args.checkpoint, args.subset, args.batch_size, args.cpu)
        os.makedirs(args.out, exist_ok=True)
        for name, labels in (("pred", pred), ("gold", gold)):
            with open(os.path.join(args.out, f"{name}.{args.subset}.txt"), "w", encoding="utf-8") as f:
                f.writelines(_fmt(x) + "\n" for x in labels)
        scores = glue_metrics(task, pred, gold)
        scores = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()}
        return report(
            {"task": task, "subset": args.subset, "checkpoint": os.path.abspath(args.checkpoint), **scores},
            os.path.join(args.out, "glue.json"),
        )
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
