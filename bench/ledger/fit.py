"""From recorded steps to lines: the events of a step summed per op class (or per op), the two sample batches
checked to run the same op sequence, every quantity fitted exactly through them (value = const + slope *
batch), and a step counted at a third batch compared with the line."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.ledger.recorder import PHASES, OpEvent, StepCount
from bench.ledger.rules import ATTENTION_BACKWARD_FACTOR, MATMUL_CLASSES, LedgerError

QUANTITIES = ("launches", "bytes_read", "bytes_written", "bytes", "flops", "triton_kernels", "gpu_kernels")


def aggregate(events: Sequence[OpEvent], key: Callable[[OpEvent], str] = lambda e: e.op_class
              ) -> dict[str, dict[str, int]]:
    """Per key (class by default): launches, bytes read / written / both, FLOPs, Triton kernels, GPU kernels,
    and the free ops (views, allocations) apart."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*QUANTITIES, "free_ops"), 0))
    for e in events:
        row = table[key(e)]
        if not e.launches:
            row["free_ops"] += 1
            continue
        row["launches"] += e.launches
        row["bytes_read"] += e.bytes_read
        row["bytes_written"] += e.bytes_written
        row["bytes"] += e.bytes_read + e.bytes_written
        row["flops"] += e.flops
        row["triton_kernels"] += e.triton_kernels
        # On a GPU a custom op is its Triton kernels; an aten op is (about) one kernel.
        row["gpu_kernels"] += e.launches if e.name.startswith("aten.") else e.triton_kernels
    return dict(table)


def op_key(e: OpEvent) -> str:
    """An op's row in the per-op table: its name, and the custom op whose body ran it."""
    return e.name if e.parent is None else f"{e.name} in {e.parent}"


def totals(events: Sequence[OpEvent]) -> dict[str, int]:
    """The step's totals: every quantity of ``aggregate``, matmul-class and other bytes apart, FLOPs with the
    attention backward counted as 2x forward, and FLOPs and launches per phase."""
    by_class = aggregate(events)
    out = dict.fromkeys((*QUANTITIES, "free_ops"), 0)
    for row in by_class.values():
        for k, v in row.items():
            out[k] += v
    out["matmul_bytes"] = sum(r["bytes"] for c, r in by_class.items() if c in MATMUL_CLASSES)
    out["other_bytes"] = out["bytes"] - out["matmul_bytes"]
    out["matmul_flops"] = sum(r["flops"] for c, r in by_class.items() if c in MATMUL_CLASSES)
    # The same step with attention backward counted as 4 products (2x forward, no recomputation), the convention
    # of FLOP counters that follow the math rather than the flash kernels.
    attn_bwd = sum(e.flops for e in events if e.op_class == "attention" and e.phase == "backward")
    out["flops_attention_bwd_2x"] = out["flops"] - attn_bwd + round(attn_bwd * 2 / ATTENTION_BACKWARD_FACTOR)
    for phase in PHASES:
        sub = [e for e in events if e.phase == phase]
        out[f"{phase}_flops"] = sum(e.flops for e in sub)
        out[f"{phase}_launches"] = sum(e.launches for e in sub)
    return out


def check_same_sequence(a: StepCount, b: StepCount) -> None:
    """The two batches must run the same ops in the same order (else extrapolation would be meaningless)."""
    seq_a = [(e.name, e.phase, e.parent) for e in a.events]
    seq_b = [(e.name, e.phase, e.parent) for e in b.events]
    if seq_a == seq_b:
        return
    i = next((i for i, (x, y) in enumerate(zip(seq_a, seq_b, strict=False)) if x != y), min(len(seq_a), len(seq_b)))
    op_a = seq_a[i] if i < len(seq_a) else "end of step"
    op_b = seq_b[i] if i < len(seq_b) else "end of step"
    raise LedgerError(f"ledger: the op sequence depends on the batch: {len(seq_a)} ops at batch {a.batch}, "
                      f"{len(seq_b)} at batch {b.batch}; first difference at op {i}: {op_a} vs {op_b}. "
                      "A batch-dependent op sequence is a bug in the step (report it), not something to average")


@dataclass(frozen=True)
class Linear:
    """value(batch) = const + slope * batch, fitted exactly through two batches."""

    const: float
    slope: float

    @classmethod
    def fit(cls, b1: int, v1: float, b2: int, v2: float) -> Linear:
        slope = (v2 - v1) / (b2 - b1)
        return cls(v1 - slope * b1, slope)

    def at(self, batch: int) -> float:
        return self.const + self.slope * batch


def fit_tables(t1: dict, t2: dict, b1: int, b2: int) -> dict[str, dict[str, Linear]]:
    """Two ``aggregate`` tables (at batches b1, b2) -> per row and quantity, the line through both (a row missing
    at one batch counts as zeros there)."""
    keys = sorted(set(t1) | set(t2))
    zero = dict.fromkeys(next(iter(t1.values())).keys() if t1 else (), 0)
    return {k: {q: Linear.fit(b1, t1.get(k, zero)[q], b2, t2.get(k, zero)[q]) for q in t1.get(k, t2.get(k))}
            for k in keys}


def fit_steps(s1: StepCount, s2: StepCount) -> dict:
    """The lines through two recorded steps (same op sequence, checked): per class, per op, in total, and the
    bytes saved for backward."""
    check_same_sequence(s1, s2)
    b1, b2 = s1.batch, s2.batch
    t1, t2 = totals(s1.events), totals(s2.events)
    return {"by_class": fit_tables(aggregate(s1.events), aggregate(s2.events), b1, b2),
            "by_op": fit_tables(aggregate(s1.events, op_key), aggregate(s2.events, op_key), b1, b2),
            "total": {q: Linear.fit(b1, v, b2, t2[q]) for q, v in t1.items()},
            "saved": Linear.fit(b1, s1.saved_bytes, b2, s2.saved_bytes)}


def extrapolation_check(by_op: dict[str, dict[str, Linear]], saved: Linear, sample: StepCount) -> dict:
    """Compare a step counted at another batch with the fit: every op (by ``op_key``) and quantity that the
    line does not predict exactly, and the total bytes error."""
    measured = aggregate(sample.events, op_key)
    inexact, bytes_error = [], 0.0
    for key in sorted(set(measured) | set(by_op)):
        fits = by_op.get(key)
        for q in ("launches", "bytes_read", "bytes_written", "flops", "triton_kernels"):
            predicted = fits[q].at(sample.batch) if fits else 0
            got = measured.get(key, {}).get(q, 0)
            if predicted != got:
                inexact.append({"op": key, "quantity": q, "predicted": predicted, "measured": got})
                if q in ("bytes_read", "bytes_written"):
                    bytes_error += abs(predicted - got)
    predicted_saved = saved.at(sample.batch)
    total_bytes = sum(row["bytes"] for row in measured.values())
    return {"batch": sample.batch, "exact": not inexact and predicted_saved == sample.saved_bytes,
            "inexact": inexact, "bytes_error": bytes_error, "bytes_error_fraction": bytes_error / max(total_bytes, 1),
            "saved_predicted": predicted_saved, "saved_measured": sample.saved_bytes}
