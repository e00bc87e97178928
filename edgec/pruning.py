"""`edgec compile --prune`: structured pruning chosen by ratio, by latency budget or by accuracy budget.

    --prune heads=0.25,ffn=0.25[,reconstruct=off]   remove those shares of all heads / FFN neurons
    --prune auto --latency-budget 5                  the most accurate pruning whose estimated latency fits 5 ms
    --prune auto --accuracy-budget 0.97              the fastest pruning whose output cosine stays >= 0.97

A budget search chooses the heads share and the FFN share apart: they buy latency at different prices
in accuracy, and which is cheaper depends on the model and on how much goes. On all-MiniLM-L6-v2
(512 calibration sentences, sentence-embedding cosine on other text) removing 15% of the heads and
40% of the FFN neurons kept 0.9231 where 30% of both kept 0.9158, for about the same FLOPs; yet a
quarter of both kept 0.9378 where 40% of the FFN neurons alone (a few FLOPs fewer) kept 0.9316.
With --latency-budget 2.67 on x86-64 (3.30 ms unpruned; 320 news sentences, 2 minutes on two cores)
the search chose 15% of the heads and 25% of the FFN neurons (0.9595 on its held-out samples; 0.9633 on
the compile's check) over 35% of the neurons alone (0.9546) and 30% of the heads with 15% (0.9545).
Most of that time is refits: each runs the pruned model from the layer before its own (common.Carry),
and the unpruned model's values they reproduce are computed once for all the candidates
(common.Reference); 18 latency estimates need only the pruned shapes and rank nothing (4.4 minutes
before those three). The latency is the target's roofline
estimate (edgec.targets.cost) of the pruned model as the backend lowers it, at the compile's shapes,
labelled as an estimate; the accuracy is the mean output cosine to the unpruned model on calibration
samples held out from the candidates' refit (see SEARCH_SAMPLES), never the compile's check samples:
the best of many candidates measured on some samples looks better on them than it is. Each share is
binary-searched on the assumption that pruning more of either never helps accuracy. The chosen mix
is then pruned and refit on all the calibration data but the compile's check samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from edgec.errors import UserError

# The FFN shares a budget search chooses from, and the heads shares it mixes them with.
RATIO_STEP = 0.05
MAX_RATIO = 0.75
HEAD_RATIOS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
# The accuracy budget of a pruned compile when the user gives none (least mean output cosine).
DEFAULT_PRUNE_BUDGET = 0.95
# Calibration samples held out from every refit to measure a pruned model on (the compile's check and a
# budget search's candidates; at most half of them), and the most of the others a search ranks and refits
# its candidates on. Measured on the samples it was refit on, a pruned model looks far better than it
# is: on all-MiniLM-L6-v2 refit on 64 sentences, 60% of the heads and 70% of the FFN neurons kept 0.9517
# on those and 0.8986 on other text.
SEARCH_SAMPLES = 64
SEARCH_FIT = 256


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

    heads: float = 0.0
    ffn: float = 0.0
    tried: list[dict] = field(default_factory=list)
    reason: str = ""


def significant(ms: float) -> float:
    """An estimate as the report gives it: six significant digits, which a tiny model's microseconds keep."""
    return float(f"{ms:.6g}")


def estimate_ms(model, target, precision: str, bindings: dict[str, int] | None, lowering: str = "") -> float:
    """The target's roofline estimate of `model` in the form its backend runs it: a copy lowered by
    `lowering` (the backend's lowering pipeline). The form decides which removal looks cheaper. On
    all-MiniLM-L6-v2 at 8x65 on x86-64-avx2, the exporter's form rated 45% of the heads gone 3% faster
    than 45% of the FFN neurons gone, its per-head reshapes and transposes charged as memory traffic;
    onnxruntime, which runs attention as one fused op, ran the FFN-pruned model 14-17% faster, and the
    lowered form's estimate has it 19% faster (it rates every FLOP alike, where onnxruntime's attention
    runs slower per FLOP than its GEMMs: removing heads is somewhat under-credited)."""
    from edgec.analysis.cost import model_cost
    from edgec.targets.cost import estimate_model_seconds

    if lowering:
        from edgec import ir as eir
        from edgec.passes.core import PassContext
        from edgec.passes.manager import PassManager

        model = eir.clone(model)
        PassManager(lowering, PassContext(target=target)).run(model)
    return 1e3 * estimate_model_seconds(model_cost(model, bindings), target, precision)


def search(model, feeds: dict, target, precision: str, *, latency_budget_ms: float | None, accuracy_budget: float | None,
           reconstruct: bool, bindings: dict[str, int] | None, step: Callable[[str], None], lowering: str = "",
           multiple: int = 1, has_heads: bool = True, has_ffn: bool = True) -> Search:
    """The heads and FFN shares for --prune auto, one mix per heads share of HEAD_RATIOS: with a
    latency budget each mix is the least FFN share that fits it and the one kept is the most accurate
    (checked against the accuracy budget when there is one); with only an accuracy budget each mix is
    the most FFN share that keeps it and the one kept has the least estimated latency. Either way the
    FFN share a mix needs never grows with its heads share, which bounds each binary search. The
    candidates are refit on some of `feeds` and measured on others (`split_for_search`, shares a
    multiple of the batch size the model fixes, `multiple`). A model without heads (or FFN neurons)
    the passes can cut is searched over the other kind alone (`has_heads`, `has_ffn`)."""
    from edgec import ir as eir
    from edgec.passes.core import PassContext
    from edgec.passes.manager import PassManager
    from edgec.analysis.structure import find_feed_forward
    from edgec.passes.prune.common import CALIBRATION_FEEDS_KEY, REFERENCE_KEY, REFERENCE_VALUES_KEY, even_shares
    from edgec.verify import compare, run_model, token_mask

    ffn_ratios = [round(RATIO_STEP * i, 4) for i in range(int(round(MAX_RATIO / RATIO_STEP)) + 1)] if has_ffn else [0.0]
    head_ratios = HEAD_RATIOS if has_heads else HEAD_RATIOS[:1]
    found = Search()
    fit, held_out = split_for_search(feeds, multiple)
    estimates: dict[tuple[float, float], float] = {}
    cosines: dict[tuple[float, float], float] = {}
    measured_ms: dict[tuple[float, float], float] = {}  # the estimates of the copies cosine() pruned
    reference: list = []
    without_ffn: dict[bool, tuple[float, object]] = {}  # by refit or not: the last heads share's model
    unpruned_values: dict = {}  # the unpruned model's values every FFN refit reproduces, computed once

    def passes(text: str, copy, **options) -> None:
        ctx = PassContext(target=target, options={CALIBRATION_FEEDS_KEY: fit, "progress": step, **options})
        PassManager(text, ctx).run(copy)

    def pruned(heads: float, ffn: float, with_reconstruction: bool):
        """A pruned copy. The search goes through the heads shares in turn, so the heads of one share are
        removed once and its FFN shares start from there, refit (as in one pipeline) to reproduce the
        unpruned model's layers."""
        flag = str(with_reconstruction).lower()
        copy = eir.clone(without_heads(heads, with_reconstruction))
        passes(f"remove-ffn-neurons{{ratio={ffn:g},reconstruct={flag}}},cleanup" if ffn else "cleanup", copy,
               **{REFERENCE_KEY: (copy, model), REFERENCE_VALUES_KEY: unpruned_values})
        return copy

    def without_heads(heads: float, with_reconstruction: bool):
        if without_ffn.get(with_reconstruction, (None,))[0] != heads:
            copy = eir.clone(model)
            if heads:
                passes(f"remove-attention-heads{{ratio={heads:g},reconstruct={str(with_reconstruction).lower()}}}", copy)
            without_ffn[with_reconstruction] = (heads, copy)
        return without_ffn[with_reconstruction][1]

    def shaped(heads: float, ffn: float):
        """A copy with the heads share gone (ranked, as without refit) and the FFN share taken evenly
        from every layer, its first neurons: the shape of a pruned model, with no FFN ranking to run."""
        copy = eir.clone(without_heads(heads, False))
        blocks = find_feed_forward(copy)
        shares = even_shares([b.intermediate for b in blocks], int(round(ffn * sum(b.intermediate for b in blocks))))
        neurons = [f"{layer}.{unit}" for layer, share in enumerate(shares) for unit in range(share)]
        passes(f"remove-ffn-neurons{{neurons={':'.join(neurons)},reconstruct=false}},cleanup" if neurons else "cleanup", copy)
        return copy

    def estimate(heads: float, ffn: float) -> float:
        if (heads, ffn) not in estimates:
            step(f"estimating latency at heads {heads:g}, ffn {ffn:g}")
            # Which units go barely changes the estimate (a refit adds no node): neither a refit nor
            # the FFN ranking is needed to measure it, and a copy cosine() pruned already serves.
            # Unpruned: the model as the compile estimates it (without the cleanup a pruned copy gets).
            if (heads, ffn) in measured_ms:
                estimates[heads, ffn] = measured_ms[heads, ffn]
            else:
                copy = shaped(heads, ffn) if heads or ffn else model
                estimates[heads, ffn] = estimate_ms(copy, target, precision, bindings, lowering)
            found.tried.append({"heads": heads, "ffn": ffn, "estimated_ms": significant(estimates[heads, ffn])})
        return estimates[heads, ffn]

    def cosine(heads: float, ffn: float) -> float:
        if (heads, ffn) not in cosines:
            step(f"measuring accuracy at heads {heads:g}, ffn {ffn:g}")
            if not reference:
                reference.append(run_model(model, held_out))
            copy = pruned(heads, ffn, reconstruct)
            measured_ms[heads, ffn] = estimate_ms(copy, target, precision, bindings, lowering)
            cosines[heads, ffn] = compare(reference[0], run_model(copy, held_out), token_mask(held_out))["cosine_mean"]
            found.tried.append({"heads": heads, "ffn": ffn, "cosine_mean": round(cosines[heads, ffn], 6)})
        return cosines[heads, ffn]

    def choose(heads: float, ffn: float, reason: str) -> Search:
        found.heads, found.ffn, found.reason = heads, ffn, reason
        return found

    if latency_budget_ms is not None:
        if estimate(0.0, 0.0) <= latency_budget_ms:
            return choose(0.0, 0.0, f"the model's estimated latency is already within {latency_budget_ms:g} ms")
        mixes = []
        top = len(ffn_ratios) - 1
        for heads in head_ratios:
            if estimate(heads, ffn_ratios[top]) > latency_budget_ms:
                continue
            over, fits = -1, top  # ffn_ratios[fits] fits the budget, ffn_ratios[over] does not (-1: none tried)
            while fits - over > 1:
                middle = (over + fits) // 2
                if estimate(heads, ffn_ratios[middle]) <= latency_budget_ms:
                    fits = middle
                else:
                    over = middle
            if not mixes or fits < top:  # the same FFN share with more heads gone: never more accurate
                mixes.append((heads, ffn_ratios[fits]))
            top = fits
            if fits == 0:  # more heads would only remove more than the budget needs
                break
        if not mixes:
            worst = estimate(head_ratios[-1], ffn_ratios[-1])
            most = " and ".join(f"{share:.0%} of the {what}" for share, what in
                                ((head_ratios[-1], "heads"), (ffn_ratios[-1], "FFN neurons")) if share)
            raise UserError(f"--latency-budget {latency_budget_ms:g} ms is out of reach: pruning {most} gives an estimated "
                            f"{worst:.3g} ms on {target.name}", "raise the budget, or choose a faster --precision or target")
        within = f"the least pruning whose estimated latency is within {latency_budget_ms:g} ms"
        if len(mixes) == 1 and accuracy_budget is None:
            return choose(*mixes[0], within)
        best = max(mixes, key=lambda mix: cosine(*mix))  # ties: the fewer heads
        if accuracy_budget is not None and cosine(*best) < accuracy_budget:
            raise UserError(f"no pruning meets both budgets: of the mixes within {latency_budget_ms:g} ms, the most accurate "
                            f"(heads {best[0]:g}, ffn {best[1]:g}) has mean output cosine {cosine(*best):.4f}, below {accuracy_budget}",
                            "relax one of --latency-budget / --accuracy-budget")
        reason = within if len(mixes) == 1 else \
            f"the most accurate of {len(mixes)} mixes of heads and FFN neurons, each {within}"
        if accuracy_budget is not None:
            reason += f", keeping mean cosine >= {accuracy_budget}"
        return choose(*best, reason)

    kept = []  # (estimate, heads, ffn) of each mix that keeps the budget
    top = len(ffn_ratios) - 1
    for heads in head_ratios:
        # The FFN share the previous heads share kept is the most this one can keep: tried first (the
        # usual answer), then a binary search below it.
        if cosine(heads, ffn_ratios[top]) >= accuracy_budget:
            keeps = top
        else:
            keeps, breaks = (0 if not heads else -1), top  # -1: not even this heads share alone keeps it
            while breaks - keeps > 1:
                middle = (keeps + breaks) // 2
                if cosine(heads, ffn_ratios[middle]) >= accuracy_budget:
                    keeps = middle
                else:
                    breaks = middle
            if keeps < 0:
                break  # more heads never help accuracy
        if heads or keeps:
            kept.append((estimate(heads, ffn_ratios[keeps]), heads, ffn_ratios[keeps]))
        top = keeps
    if not kept:
        firsts = [(f"{ffn_ratios[1]:.0%} of the FFN neurons", cosines[0.0, ffn_ratios[1]])] if has_ffn else []
        if has_heads and (head_ratios[1], 0.0) in cosines:
            firsts.append((f"{head_ratios[1]:.0%} of the heads", cosines[head_ratios[1], 0.0]))
        raise UserError(f"--accuracy-budget {accuracy_budget} allows no pruning: removing "
                        + ", ".join(f"{what} already gives mean output cosine {c:.4f}" if i == 0 else f"{what} {c:.4f}"
                                    for i, (what, c) in enumerate(firsts)),
                        "lower the budget, or compile without --prune")
    _, heads, ffn = min(kept)
    return choose(heads, ffn, f"the least estimated latency of {len(kept)} mixes of heads and FFN neurons whose mean output "
                              f"cosine on held-out calibration samples stays >= {accuracy_budget}")


def hold_out(feeds: dict, multiple: int = 1, keep: int = 1) -> tuple[dict, dict]:
    """The calibration samples to refit on and those held out to measure the result on: SEARCH_SAMPLES
    spread over them (data of several sources in turn, or sorted by length, is measured on all of
    it), at most half, a multiple of `multiple` (a batch size the model fixes), leaving at least
    `keep`. Where none can be held out, all of them both."""
    count = min((len(v) for v in feeds.values()), default=0)
    held = min(SEARCH_SAMPLES, count // 2, count - keep) // multiple * multiple
    if held <= 0:
        return feeds, feeds
    return _split(feeds, count, held)


def split_for_search(feeds: dict, multiple: int = 1) -> tuple[dict, dict]:
    """The calibration samples a budget search refits its candidates on (at most SEARCH_FIT, spread
    over them), and those it measures them on (`hold_out`), each a multiple of `multiple` where they can be."""
    rest, held = hold_out(feeds, multiple)
    count = min((len(v) for v in rest.values()), default=0)
    fit = min(count, SEARCH_FIT)
    fit = fit // multiple * multiple or fit
    return _split(rest, count, fit)[1], held


def _split(feeds: dict, count: int, picked: int) -> tuple[dict, dict]:
    """(the other samples, `picked` samples spread over the first `count`), each in their order."""
    import numpy as np

    from edgec.quantize.calibrate import spread

    chosen = np.zeros(count, dtype=bool)
    chosen[spread(count, picked)] = True
    return {k: v[:count][~chosen] for k, v in feeds.items()}, {k: v[:count][chosen] for k, v in feeds.items()}


def report(records: dict | None, request: PruneRequest, chosen: Search | None, estimate: dict | None) -> dict:
    """The report's `pruning` entry: what was asked, chosen and removed, layer by layer."""
    records = records or {}
    heads, ffn = records.get("heads", []), records.get("ffn", [])
    return {
        "heads_ratio": request.heads,
        "ffn_ratio": request.ffn,
        "reconstruct": request.reconstruct,
        "search": None if chosen is None else {"heads": chosen.heads, "ffn": chosen.ffn, "reason": chosen.reason,
                                               "tried": chosen.tried},
        "heads_removed": sum(r["removed"] for r in heads),
        "neurons_removed": sum(r["removed"] for r in ffn),
        "heads": heads,
        "ffn": ffn,
        "estimated_latency_ms": estimate,
    }
