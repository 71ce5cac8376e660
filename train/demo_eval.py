"""The offline evaluation demo: does pre-training help? On scikit-learn's digits (shipped in its wheel).

    python -m train.demo_eval                 # a few CPU minutes

1. pre-trains a tiny CrossMAE on digits/train (32-pixel images, 4-pixel patches),
2. linear-probes its frozen encoder on digits/train, evaluating on digits/val,
3. linear-probes a randomly initialised encoder of the same shape the same way,
and writes both accuracies to ``<output_dir>/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train import classify, pretrain

ENCODER = ["--img_size", "32", "--patch_size", "4"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo_eval", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="output/demo_eval")
    p.add_argument("--pretrain_epochs", type=int, default=30)
    p.add_argument("--probe_epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    common = ["--seed", str(args.seed), "--data_backend", "torch", "--num_workers", "2"]

    status = pretrain.main(["--model", "crossmae_vit_tiny_patch8", *ENCODER, "--data_path", "digits/train",
                            "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "3", "--blr", "1.5e-3",
                            "--recon_every", "0", "--log_every", "50", "--output_dir", str(out / "pretrain"), *common])
    if status != 0:
        return status
    results = {}
    for name, init in (("pre-trained", ["--finetune", str(out / "pretrain" / "checkpoint-last.pth")]),
                       ("random init", [])):
        probe_dir = out / f"linprobe-{name.split()[0].replace('-', '')}"
        status = classify.main("linprobe", ["--model", "vit_tiny_patch8", *ENCODER, "--data_path", "digits",
                                            "--epochs", str(args.probe_epochs), "--output_dir", str(probe_dir),
                                            *init, *common])
        if status != 0:
            return status
        last = json.loads((probe_dir / "metrics.jsonl").read_text().splitlines()[-1])
        results[name] = {"val_top1": round(last["val_top1"], 2), "best_top1": round(last["best_top1"], 2)}

    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = ["| encoder | linear-probe top-1 (last epoch) | best epoch |", "|---|---|---|"]
    table += [f"| {name} | {r['val_top1']:.2f}% | {r['best_top1']:.2f}% |" for name, r in results.items()]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
