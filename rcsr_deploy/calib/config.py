"""``QuantizeConfig``: everything that determines the quantized weights (stored in ``quantization_config.method``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import RcsrError
from ..format import QuantSpec, check_act_order

METHODS = ("rtn", "gptq", "gptaq", "snrq", "ksnrq")
MOE_FALLBACKS = ("all", "neighbours", "rtn")


#: ``--alpha closed-form`` decodes once at this α, computes α* from that decode, then decodes at α*.
#: α* minimises ‖W_ref(α) − Q‖_H for the Q it is given, so it stays near the α that produced Q: started
#: from the GPTQ point (α = 0) it returns an α* near 0 and GPTQ's quality (docs/RESULTS.md has the
#: measurement).  The reference code starts from its default fixed α, 0.25; so do we.
CLOSED_FORM_START = 0.25

#: ``--alpha heldout``'s candidates, judged per layer on held-back calibration sequences
#: (``objective`` module doc).  α = 0 is GPTQ's target: the choice never loses to it on held-out data.
AUTO_ALPHAS = (0.0, 0.125, 0.25, 0.5, 1.0)

#: ``--alpha auto``'s candidates, judged per model on held-back calibration text (``pipeline._select_alpha``):
#: α = 0 (GPTQ's target) and the paper's sampled α.
AUTO_CANDIDATES = ("0.0", "sample")
#: ``--auto-sarqc LAMBDA``'s extra candidate: the sampled α with SARQC's drift penalty at LAMBDA
AUTO_SARQC_CANDIDATE = "sample+sarqc"

#: ``--alpha auto`` keeps the regularized candidate only when its held-back NLL is lower than α = 0's by more
#: than this many nats per token (0.02: 2 % perplexity); a smaller gain is a tie, and a tie keeps α = 0.
#: The held-back windows come from the calibration text, not from the text the model will serve: on
#: Gemma-3-270m W4 per-channel seed 2 a held-back gain of 0.012 nats came with a 1.7 % *loss* on Moby-Dick
#: (docs/RESULTS.md), so gains of that size are not evidence.
AUTO_MARGIN = 0.02


#: ``--alpha auto`` holds back at least this many tokens (the NLL difference of two candidates is a mean
#: over them: fewer make the choice noisy)
HELD_BACK_TOKENS = 4096


def held_back_windows(nsamples: int, seqlen: int) -> int:
    """How many calibration-length windows ``--alpha auto`` holds back: a quarter of ``nsamples``, at least
    four and at least ``HELD_BACK_TOKENS`` tokens."""
    return max(4, nsamples // 4, -(-HELD_BACK_TOKENS // seqlen))


@dataclass
class QuantizeConfig:
    """Everything that determines the quantized weights (stored in ``quantization_config.method``)."""

    method: str = "snrq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    beam: int = 1
    alpha: str = "sample"  # "sample" | "closed-form" | "auto" | "heldout" | a float as string
    alpha_m: float = 5.0
    alpha_margin: float = AUTO_MARGIN  # --alpha auto: NLL gain (nats/token) the regularized α must show
    # --alpha auto: a second held-back text, of another domain than the calibration text ("" = none); the
    # regularized α must clear the margin on it too (pipeline.pick_auto_candidate)
    alpha_check: str = ""
    # --alpha auto: > 0 adds a third candidate, the sampled α with SARQC at this λ (pipeline._select_alpha)
    auto_sarqc: float = 0.0
    sarqc_lambda: float = 0.0
    clip: str = "auto"  # "auto" | "minmax" | "mse"; auto is resolved in __post_init__
    act_order: str = "static"  # "none" | "static" | "dynamic"
    percdamp: float = 0.01
    block: int = 128
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calib: str = "sotu"
    batch_size: int = 8
    blocks: str = ""  # subset of decoder blocks to quantize, e.g. "0-3" or "0,5" ("" = all)
    lm_head: bool = False  # also quantize the output head (with a tied embedding: the shared table)
    # Mixture-of-Experts: "routed" calibrates each expert on the tokens the (quantized-path) router sends
    # it; an expert with fewer than ``moe_min_tokens`` routed tokens falls back to all tokens of the
    # block.  "all" calibrates every expert on all tokens (llm-compressor's default).
    moe_calib: str = "routed"
    moe_min_tokens: int = 64
    # what an expert with fewer than ``moe_min_tokens`` routed tokens is calibrated on: "all" tokens of the
    # block, the routed tokens of its "neighbours" (the experts whose router rows are most similar), or
    # nothing ("rtn": round to nearest with the weight-MSE clip search)
    moe_fallback: str = "all"
    # mixed precision: --avg-bits B allocates a width from ``widths`` to every layer within B bits per weight
    # (allocate.py; 0 = off), ``bits_rules`` ("REGEX=BITS") pin layers; the result lands in ``module_grids``:
    # full module name -> {"bits": b, "group_size": g} overriding the grid above.  ``group_sizes`` (empty =
    # ``group_size`` alone) lets the allocation choose a group size per layer as well as a width.
    avg_bits: float = 0.0
    widths: tuple = (2, 3, 4)
    group_sizes: tuple = ()
    # measure the candidate allocations end to end on held-back windows and keep the best (allocate.py)
    alloc_check: bool = True
    bits_rules: tuple = ()
    module_grids: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # ``auto``: the H-weighted clip search for every calibrated method (it lowers their perplexity
        # markedly, docs/RESULTS.md); the full range for plain RTN, which then needs no calibration data
        # (RTN + SARQC searches: it needs the grid).
        if self.clip == "auto":
            self.clip = "minmax" if self.method == "rtn" and self.sarqc_lambda == 0 else "mse"

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def spec_for(self, name: str) -> QuantSpec:
        """The grid of one module (full name): its ``module_grids`` entry, else the top-level grid."""
        g = self.module_grids.get(name, {})
        return QuantSpec(g.get("bits", self.bits), g.get("group_size", self.group_size), self.sym)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RcsrError(f"unknown method {self.method!r} (choose {', '.join(METHODS)})")
        self.spec.check()
        for g in self.module_grids.values():
            QuantSpec(g.get("bits", self.bits), g.get("group_size", self.group_size), self.sym).check()
        check_act_order(self.act_order)
        if self.beam < 1:
            raise RcsrError("--beam must be >= 1")
        if self.beam > 1 and self.method != "ksnrq":
            raise RcsrError(f"--beam {self.beam} needs --method ksnrq")
        if self.alpha not in ("sample", "closed-form", "auto", "heldout"):
            try:
                a = float(self.alpha)
            except ValueError:
                raise RcsrError(f"--alpha must be 'sample', 'closed-form', 'auto', 'heldout' or a number in [0, 1], "
                                f"got {self.alpha!r}") from None
            if not 0.0 <= a <= 1.0:
                raise RcsrError(f"--alpha must be in [0, 1], got {a}")
        if self.sarqc_lambda < 0:
            raise RcsrError("--sarqc-lambda must be >= 0")
        if self.method != "rtn" and (self.nsamples < 1 or self.seqlen < 8):
            raise RcsrError("--nsamples must be >= 1 and --seqlen >= 8")
        if self.alpha_check and self.alpha != "auto":
            raise RcsrError("--alpha-check-data is the second held-back text of --alpha auto: it needs --alpha auto")
        if not (math.isfinite(self.auto_sarqc) and self.auto_sarqc >= 0):
            raise RcsrError(f"--auto-sarqc must be a number >= 0 (the SARQC lambda), got {self.auto_sarqc}")
        if self.auto_sarqc and self.alpha != "auto":
            raise RcsrError("--auto-sarqc adds a candidate to --alpha auto: it needs --alpha auto")
        if not (math.isfinite(self.alpha_margin) and self.alpha_margin >= 0):
            raise RcsrError(f"--alpha-margin must be a number >= 0 (nats per token), got {self.alpha_margin}")
        if self.alpha == "heldout" and self.method in ("snrq", "ksnrq") and self.nsamples < 2:
            raise RcsrError("--alpha heldout holds calibration sequences back: it needs --nsamples >= 2")
        if self.avg_bits:
            for w in self.widths:
                for g in self.group_sizes or (self.group_size,):
                    QuantSpec(w, g, self.sym).check()
            lo = min(self.widths)
            if not lo <= self.avg_bits <= 16:
                raise RcsrError(f"--avg-bits {self.avg_bits} must be at least the smallest width {lo}")
        if self.moe_calib not in ("routed", "all"):
            raise RcsrError(f"--moe-calib must be 'routed' or 'all', got {self.moe_calib!r}")
        if self.moe_fallback not in MOE_FALLBACKS:
            raise RcsrError(f"--moe-fallback must be one of {', '.join(MOE_FALLBACKS)}, got {self.moe_fallback!r}")
        if self.moe_min_tokens < 0:
            raise RcsrError("--moe-min-tokens must be >= 0")
        if self.clip not in ("minmax", "mse"):
            raise RcsrError("--clip must be auto, minmax or mse")

    def block_set(self, n_blocks: int) -> list[int]:
        if not self.blocks:
            return list(range(n_blocks))
        out: set[int] = set()
        try:
            for part in self.blocks.split(","):
                a, _, b = part.strip().partition("-")
                out.update(range(int(a), int(b or a) + 1))
        except ValueError:
            raise RcsrError(f"--blocks must look like '0-3' or '0,5', got {self.blocks!r}") from None
        bad = [i for i in out if not 0 <= i < n_blocks]
        if bad:
            raise RcsrError(f"--blocks selects block {bad[0]} but the model has {n_blocks} blocks")
        return sorted(out)

    # -- derived behaviour -------------------------------------------------------------------
    @property
    def alpha_mode(self) -> tuple[str, float]:
        """('fixed', α) | ('sample', 1.0) | ('closed-form', CLOSED_FORM_START) | ('heldout', 0.0) after method
        defaults.  ``auto`` is chosen per model by ``pipeline.quantize_to_checkpoint``, which calls the block
        loop once per candidate with a concrete α; the loop itself cannot take it."""
        if self.method == "gptq":
            return "fixed", 0.0
        if self.method == "gptaq":
            return "fixed", 1.0
        if self.alpha == "sample":
            return "sample", 1.0
        if self.alpha == "closed-form":
            return "closed-form", CLOSED_FORM_START
        if self.alpha == "heldout":
            return "heldout", 0.0
        if self.alpha == "auto":
            raise RcsrError("--alpha auto is chosen per model (rcsr quantize / pipeline.quantize_to_checkpoint); "
                            "the calibration loop needs a concrete alpha")
        return "fixed", float(self.alpha)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.clip == "mse" or self.sarqc_lambda > 0

    @property
    def needs_fp_stream(self) -> bool:
        mode, a = self.alpha_mode
        return self.method != "rtn" and (mode != "fixed" or a != 0.0)

    @property
    def effective_beam(self) -> int:
        return self.beam if self.method == "ksnrq" else 1
