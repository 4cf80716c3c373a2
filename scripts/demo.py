#!/usr/bin/env python
"""The demo: dense vs vanilla MoE vs MEO language models on a small bundled Wikipedia corpus.

Prepares examples/data/enwiki with scripts/prepare_wikitext.sh (sentencepiece), trains three
language models of the same size for the same number of updates with fairseq-train on the CPU,
evaluates them, and prints one table (parameters, active parameters per token, validation and
test perplexity, training words/s, generation sentences/s). Writes plots of the validation curves
and of the routing mass per expert and layer to --out.

    python scripts/demo.py [--out runs/demo] [--updates 600]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "meo_fairseq")

MODELS = {
    "dense": ["--moe-mode", "dense"],
    "moe": ["--moe-mode", "moe", "--moe-level", "token"],
    "meo": ["--moe-mode", "meo", "--moe-level", "sequence", "--moe-decoder-routing", "segment"],
}


def log(msg):
    print(f"[demo] {msg}", flush=True)


def run(cmd, logfile=None):
    log(" ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if logfile:
        with open(logfile, "w") as f:
            f.write(out.stdout)
    if out.returncode != 0:
        sys.stdout.write(out.stdout[-4000:])
        raise SystemExit(f"[demo] command failed ({out.returncode}): {' '.join(cmd)}")
    return out.stdout


def train(name, args, data, out):
    save = os.path.join(out, name)
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", USER_DIR,
        "--task", "language_modeling", "--arch", "meo_transformer_lm_tiny",
        "--decoder-layers", "2", "--moe-experts", str(args.experts), "--moe-top-k", str(args.top_k),
        "--moe-segment-length", "32", "--criterion", "moe_cross_entropy",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "50", "--dropout", "0.1", "--share-decoder-input-output-embed",
        "--tokens-per-sample", "128", "--sample-break-mode", "none", "--max-tokens", "2048",
        "--max-update", str(args.updates), "--validate-interval-updates", str(max(args.updates // 6, 1)),
        "--save-interval-updates", str(args.updates), "--no-epoch-checkpoints", "--save-dir", save,
        "--cpu", "--seed", "1", "--log-format", "simple", "--log-interval", "25", "--num-workers", "0",
    ] + MODELS[name]
    t0 = time.time()
    text = run(cmd, os.path.join(out, f"train_{name}.log"))
    wall = time.time() - t0
    curve = [
        (int(m.group(2)), float(m.group(1)))
        for m in re.finditer(r"valid on 'valid' subset \| loss ([\d.]+) .*?\| num_updates (\d+)", text)
    ]
    wps = [float(x) for x in re.findall(r"train_inner \|.*?wps=([\d.]+)", text)]
    return {
        "checkpoint": os.path.join(save, "checkpoint_last.pt"),
        "curve": curve,
        "train_wps": sum(wps[1:]) / max(len(wps) - 1, 1) if len(wps) > 1 else (wps[0] if wps else float("nan")),
        "train_wall_s": wall,
    }


def evaluate(info, data, args):
    import torch
    from fairseq import checkpoint_utils

    import meo_fairseq  # noqa: F401
    from meo_fairseq.modules import ExpertLinear, Router

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([info["checkpoint"]], arg_overrides={"data": data})
    model = models[0].eval()
    # parameters, and the parameters one token uses
    total = sum(p.numel() for p in model.parameters())
    active = total
    for m in model.modules():
        if isinstance(m, ExpertLinear) and m.cfg.mode != "dense":
            n = m.experts.num_experts
            per = m.experts.weight[0].numel() + (m.experts.bias[0].numel() if m.experts.bias is not None else 0)
            used = m.cfg.full_experts if m.cfg.mode == "moe" else 1
            active -= (n - used) * per
    # test perplexity and routing mass (fairseq-eval-lm's computation, in process)
    task.load_dataset("test")
    itr = task.get_batch_iterator(task.dataset("test"), max_tokens=4096, max_positions=128).next_epoch_itr(shuffle=False)
    nll, ntok = 0.0, 0
    mass = {}
    with torch.no_grad():
        for sample in itr:
            if not sample:
                continue
            out = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(out, log_probs=True)
            tgt = sample["target"]
            lp = lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            keep = tgt.ne(task.target_dictionary.pad())
            nll -= float(lp[keep].sum())
            ntok += int(keep.sum())
            for name, r in model.named_modules():
                if isinstance(r, Router) and r.stats:
                    mass.setdefault(name, []).append(r.stats["fraction"].clone())
    info["test_ppl"] = float(torch.exp(torch.tensor(nll / ntok)))
    info["params"] = total
    info["active_params"] = active
    info["routing"] = {k: torch.stack(v).mean(0).tolist() for k, v in mass.items()}
    # generation: continue prompts of 8 tokens by 24 tokens, greedy, batch of 16
    gen = task.build_generator(models, argparse.Namespace(beam=1, max_len_b=24, min_len=24, sampling=False))
    prompts = []
    for sample in task.get_batch_iterator(task.dataset("test"), max_tokens=4096, max_positions=128).next_epoch_itr(shuffle=False):
        prompts.append(sample["net_input"]["src_tokens"][:, :8])
        if sum(p.size(0) for p in prompts) >= args.gen_sentences:
            break
    prompts = torch.cat(prompts)[: args.gen_sentences]
    def step(batch):
        sample = {"net_input": {"src_tokens": batch, "src_lengths": torch.full((batch.size(0),), 8)}}
        task.inference_step(gen, models, sample, prefix_tokens=batch)

    with torch.no_grad():
        step(prompts[:16])  # warm-up
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, prompts.size(0), 16):
            step(prompts[i : i + 16])
    info["gen_sent_per_s"] = prompts.size(0) / (time.time() - t0)
    return info


def plots(results, out):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, [2 ** y for y in ys], marker="o", label=name)
    ax.set_xlabel("updates")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Validation curves (bundled enwiki sample)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "validation_curves.png"), dpi=120)
    plt.close(fig)

    routed = {k: r for k, r in results.items() if r["routing"]}
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(5 * len(routed), 3.5), squeeze=False)
        for ax, (name, r) in zip(axes[0], routed.items()):
            labels = [k.replace("decoder.layers.", "L").replace(".fc1.", " ").replace(".router", "") for k in r["routing"]]
            mat = np.array(list(r["routing"].values()))
            im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlabel("expert")
            ax.set_title(f"{name}: routing mass per expert")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "routing_heatmap.png"), dpi=120)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--gen-sentences", type=int, default=64)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data-bin")
    run(["bash", "scripts/prepare_wikitext.sh", "--raw", "examples/data/enwiki", "--format", "raw",
         "--out", data, "--vocab-size", str(args.vocab_size), "--workers", "2"])
    results = {}
    for name in MODELS:
        log(f"training {name} ({args.updates} updates)")
        results[name] = evaluate(train(name, args, data, args.out), data, args)
    plots(results, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    head = f"{'model':<6} {'params':>9} {'active/token':>12} {'valid ppl':>9} {'test ppl':>9} {'train wps':>9} {'gen sent/s':>10}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results.items():
        vppl = 2 ** r["curve"][-1][1] if r["curve"] else float("nan")
        print(f"{name:<6} {r['params']:>9,} {r['active_params']:>12,} {vppl:>9.1f} {r['test_ppl']:>9.1f} "
              f"{r['train_wps']:>9.0f} {r['gen_sent_per_s']:>10.1f}")
    print(f"\nplots: {args.out}/validation_curves.png, {args.out}/routing_heatmap.png; numbers: {args.out}/results.json")


if __name__ == "__main__":
    main()
