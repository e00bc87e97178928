"""`edgec compile --prune`: structured pruning chosen by ratio, by latency budget or by accuracy budget.

    --prune heads=0.25,ffn=0.25[,reconstruct=off]   remove those shares of all heads / FFN neurons
    --prune auto --latency-budget 5                  the least pruning whose estimated latency fits 5 ms
    --prune auto --accuracy-budget 0.97              the most pruning whose output cosine stays >= 0.97

A budget search prunes heads and FFN neurons by one shared ratio. The latency is the target's
roofline estimate (edgec.targets.cost) of the pruned model at the compile's shapes, labelled as an
estimate; the accuracy is the mean output cosine to the unpruned model on the calibration data,
measured on pruned copies (binary search: pruning more never helps accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from edgec.errors import UserError

# The shared ratios a budget search chooses from.
RATIO_STEP = 0.05
MAX_RATIO = 0.75
# The accuracy budget of a pruned compile when the user gives none (least mean output cosine).
DEFAULT_PRUNE_BUDGET = 0.95
# Calibration samples an accuracy-budget search measures each candidate on.
SEARCH_SAMPLES = 64


@dataclass
class PruneRequest:
    heads: float = 0.0
    ffn: float = 0.0
    reconstruct: bool = True
    auto: bool = False

    def pipeline(self) -> str:
        """The passes that do it, for a pipeline text ('' when nothing is removed)."""
        flag = "true" if self.reconstruct else "false"
        items = []
        if self.heads > 0:
            items.append(f"remove-attention-heads{{ratio={self.heads:g},reconstruct={flag}}}")
        if self.ffn > 0:
            items.append(f"remove-ffn-neurons{{ratio={self.ffn:g},reconstruct={flag}}}")
        return ",".join([*items, "cleanup"]) if items else ""


_USAGE = "write --prune heads=0.25,ffn=0.25 (shares of all heads / FFN neurons, 0 to 1), or --prune auto with a budget"


def parse_prune(text: str | None) -> PruneRequest | None:
    if text is None:
        return None
    text = text.strip()
    if text == "auto":
        return PruneRequest(auto=True)
    request = PruneRequest()
    seen = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("heads", "ffn", "reconstruct") or key in seen:
            raise UserError(f"--prune {item!r} is not understood", _USAGE)
        seen.add(key)
        if key == "reconstruct":
            if value.lower() not in ("on", "off", "true", "false"):
                raise UserError(f"--prune reconstruct={value!r} is not on or off", _USAGE)
            request.reconstruct = value.lower() in ("on", "true")
            continue
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"--prune {key}={value!r} is not a share between 0 and 1", _USAGE)
        setattr(request, key, ratio)
    if request.heads == 0 and request.ffn == 0:
        raise UserError(f"--prune {text!r} removes nothing", _USAGE)
    return request


def check_budgets(request: PruneRequest | None, latency_budget_ms: float | None, accuracy_budget: float | None,
                  precision: str) -> None:
    """The pruning options, checked before anything runs."""
    if latency_budget_ms is not None:
        if request is None or not request.auto:
            raise UserError("--latency-budget chooses how much --prune auto removes", "add --prune auto, or drop --latency-budget")
        if not latency_budget_ms > 0:
            raise UserError(f"--latency-budget {latency_budget_ms} is not a positive number of milliseconds",
                            "give the estimated latency to reach, e.g. --latency-budget 5")
    if request is not None and request.auto:
        if latency_budget_ms is None and accuracy_budget is None:
            raise UserError("--prune auto needs a budget to choose by", "add --latency-budget MS and/or --accuracy-budget COSINE")
        if precision == "mixed":
            raise UserError("--prune auto and --precision mixed would share one --accuracy-budget",
                            "give --prune explicit ratios (heads=..,ffn=..) with --precision mixed")


@dataclass
class Search:
    """What a budget search tried and chose."""

    ratio: float
    tried: list[dict] = field(default_factory=list)
    reason: str = ""


def estimate_ms(model, target, precision: str, bindings: dict[str, int] | None) -> float:
    from edgec.analysis.cost import model_cost
    from edgec.targets.cost import estimate_model_seconds

    return 1e3 * estimate_model_seconds(model_cost(model, bindings), target, precision)


def search(model, feeds: dict, target, precision: str, *, latency_budget_ms: float | None, accuracy_budget: float | None,
           reconstruct: bool, bindings: dict[str, int] | None, step: Callable[[str], None]) -> Search:
    """The shared ratio for --prune auto: the smallest that meets the latency budget, then checked
    (or, with only an accuracy budget, the largest that keeps it)."""
    from edgec import ir as eir
    from edgec.passes.core import PassContext
    from edgec.passes.manager import PassManager
    from edgec.passes.prune.common import CALIBRATION_FEEDS_KEY
    from edgec.verify import compare, run_model, token_mask

    ratios = [round(RATIO_STEP * i, 4) for i in range(1, int(round(MAX_RATIO / RATIO_STEP)) + 1)]
    found = Search(0.0)
    subset = {k: v[:SEARCH_SAMPLES] for k, v in feeds.items()}

    def pruned(ratio: float, with_reconstruction: bool):
        copy = eir.clone(model)
        ctx = PassContext(target=target, options={CALIBRATION_FEEDS_KEY: subset, "progress": step})
        PassManager(PruneRequest(ratio, ratio, with_reconstruction).pipeline(), ctx).run(copy)
        return copy

    floor = None
    if latency_budget_ms is not None:
        before = estimate_ms(model, target, precision, bindings)
        found.tried.append({"ratio": 0.0, "estimated_ms": round(before, 4)})
        if before <= latency_budget_ms:
            floor = 0.0
        else:
            for ratio in ratios:
                step(f"estimating latency at ratio {ratio:g}")
                # Which units go does not change the estimate: no refit needed to measure it.
                ms = estimate_ms(pruned(ratio, False), target, precision, bindings)
                found.tried.append({"ratio": ratio, "estimated_ms": round(ms, 4)})
                if ms <= latency_budget_ms:
                    floor = ratio
                    break
            if floor is None:
                raise UserError(f"--latency-budget {latency_budget_ms:g} ms is out of reach: pruning {MAX_RATIO:.0%} of the heads "
                                f"and FFN neurons gives an estimated {found.tried[-1]['estimated_ms']:.3g} ms on {target.name}",
                                "raise the budget, or choose a faster --precision or target")
        found.ratio = floor
        found.reason = f"the least pruning whose estimated latency is within {latency_budget_ms:g} ms"
        if accuracy_budget is None or floor == 0.0:
            return found

    reference = run_model(model, subset)
    mask = token_mask(subset)

    def cosine(ratio: float) -> float:
        step(f"measuring accuracy at ratio {ratio:g}")
        value = compare(reference, run_model(pruned(ratio, reconstruct), subset), mask)["cosine_mean"]
        found.tried.append({"ratio": ratio, "cosine_mean": round(value, 6)})
        return value

    if floor is not None:  # both budgets: the latency's ratio must keep the accuracy
        if cosine(floor) < accuracy_budget:
            raise UserError(f"no pruning meets both budgets: {latency_budget_ms:g} ms needs ratio {floor:g}, whose mean "
                            f"output cosine {found.tried[-1]['cosine_mean']:.4f} is below {accuracy_budget}",
                            "relax one of --latency-budget / --accuracy-budget")
        found.reason += f", and keeps mean cosine >= {accuracy_budget}"
        return found
    low, high = -1, len(ratios)  # ratios[low] keeps the budget (-1: none tried), ratios[high] breaks it
    while high - low > 1:
        middle = (low + high) // 2
        if cosine(ratios[middle]) >= accuracy_budget:
            low = middle
        else:
            high = middle
    if low < 0:
        raise UserError(f"--accuracy-budget {accuracy_budget} allows no pruning: removing {ratios[0]:.0%} of the heads and "
                        f"FFN neurons already gives mean output cosine {found.tried[-1]['cosine_mean']:.4f}",
                        "lower the budget, or compile without --prune")
    found.ratio = ratios[low]
    found.reason = f"the most pruning whose mean output cosine on calibration data stays >= {accuracy_budget}"
    return found


def report(records: dict | None, request: PruneRequest, chosen: Search | None, estimate: dict | None) -> dict:
    """The report's `pruning` entry: what was asked, chosen and removed, layer by layer."""
    records = records or {}
    heads, ffn = records.get("heads", []), records.get("ffn", [])
    return {
        "heads_ratio": request.heads,
        "ffn_ratio": request.ffn,
        "reconstruct": request.reconstruct,
        "search": None if chosen is None else {"ratio": chosen.ratio, "reason": chosen.reason, "tried": chosen.tried},
        "heads_removed": sum(r["removed"] for r in heads),
        "neurons_removed": sum(r["removed"] for r in ffn),
        "heads": heads,
        "ffn": ffn,
        "estimated_latency_ms": estimate,
    }
