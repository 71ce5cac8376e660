"""The step ledger: one full pre-training step accounted op by op, without a GPU.

    python -m bench.ledger --models crossmae_vit_base_patch16 --batch 256 --precision bf16 \\
        --backends torch,triton --card H200
    python -m bench.ledger --models crossmae_vit_base_patch16:kept_mask_ratio=0.75,mae_vit_base_patch16 --no-write

For a registry model, a backend ("torch" reference or "triton" fused kernels), a batch and a precision, the
trainer's own training step (train/step.py; step.py here) is run on the CPU under a ``TorchDispatchMode`` that
sees every aten op whatever module calls it (recorder.py). Per op class and in total it reports ops launched,
bytes read + written, FLOPs (the rules: rules.py), and the bytes saved for backward; then a roofline *estimate*
(never a measurement) for a card of train/cards.py (report.py). Backends side by side, JSON + Markdown under
bench/results/ (``ledger_<gpu>_<date>`` and ``ledger_latest``) with versions and the command (__main__.py).

Real shapes, small batches: the step runs at two small batches (default 2 and 3) and every quantity is
extrapolated linearly, value = const + slope * batch (fit.py). The op sequence must be identical at both
batches, else ``LedgerError`` names the first difference (a batch-dependent op sequence is a bug to report, not
to average over). ``--check-batch N`` counts a third batch and reports every op quantity off the line
(``extrapolation_check``). Known to be off: torch reductions inside a custom op over per-program partial sums
(bias_gelu / layer_norm / feature_mix backward), whose row count follows the launch grid, min(programs per SM x
SMs, row blocks): piecewise in the batch, and computed for the interpreter's 2 "SMs", not a GPU's 132. Their
bytes are a few hundredths of a percent of the step's.

One job per file: rules.py (what an op costs), recorder.py (the dispatch mode, Triton launch hooks and
saved-tensor hooks), step.py (the step recorded, one model's ledger), fit.py (aggregation, the lines, the
extrapolation check), report.py (every model and backend, roofline, Markdown, JSON), __main__.py (the CLI).
"""

import os

import torch

# The kernels read TRITON_INTERPRET when `kernels` is first imported; the ledger runs on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.ledger.fit import Linear, aggregate, check_same_sequence, totals
from bench.ledger.recorder import Ledger, OpEvent, StepCount
from bench.ledger.report import markdown, roofline, run_ledger, summarize, to_jsonable
from bench.ledger.rules import LedgerError, op_class, op_flops
from bench.ledger.step import BACKENDS, ledger_for

__all__ = ["BACKENDS", "Ledger", "LedgerError", "Linear", "OpEvent", "StepCount", "aggregate", "check_same_sequence",
           "ledger_for", "markdown", "op_class", "op_flops", "roofline", "run_ledger", "summarize", "to_jsonable",
           "totals"]
