"""Domain rules: the range a numeric option may take, declared once beside the parameter it constrains.

A constructor or config field carries its rule in its annotation, ``steps: Annotated[int, POSITIVE_INT] = 50``;
the schema derived from it keeps the rule as field metadata, and :func:`check_domains` tests every composed
value against it before anything is built (no torch needed), naming the key, the value and the valid range.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Domain:
    """A predicate on a value, the words for what it accepts (``valid``) and a short name for it (``what``)."""

    test: Callable[[Any], bool]
    valid: str
    what: str = "in range"

    def or_null(self, meaning: str = "") -> Domain:
        """The same rule on an optional value; ``meaning`` says what null does."""
        return Domain(self.test, f"null{f' ({meaning})' if meaning else ''} or {self.valid}", self.what)

    def where(self, note: str) -> Domain:
        """The same rule with a note on a special value, e.g. ``(0: only at the end)``."""
        return Domain(self.test, f"{self.valid} ({note})", self.what)

    def message(self, key: str, value: Any) -> str | None:
        """None if ``value`` (null is always allowed here) is in range, else the config error naming ``key``."""
        if value is None or self.test(value):
            return None
        return f"{key}={value} is out of range; valid: {self.valid}"

    def argument_error(self, owner: str, name: str, value: Any) -> str | None:
        """None if ``value`` is in range, else the error of constructing ``owner`` with ``name=value``."""
        if value is None or self.test(value):
            return None
        return f"{owner}: {name}={value} is not {self.what}; valid: {self.valid}"


POSITIVE_INT = Domain(lambda v: v >= 1, "an integer >= 1", "a positive integer")
NON_NEGATIVE_INT = Domain(lambda v: v >= 0, "an integer >= 0", "non-negative")
POSITIVE = Domain(lambda v: v > 0, "a number > 0", "positive")
NON_NEGATIVE = Domain(lambda v: v >= 0, "a number >= 0", "non-negative")
PROBABILITY = Domain(lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]", "a probability")
UNIT_OPEN = Domain(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)", "in [0, 1)")  # dropout, t_min
OPEN_UNIT = Domain(lambda v: 0.0 < v < 1.0, "a number in (0, 1)", "in (0, 1)")  # EMA decay
FRACTION = Domain(lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)", "in (0, 1)")
POSITIVE_INTS = Domain(
    lambda v: len(v) >= 1 and all(m >= 1 for m in v),
    "a non-empty list of integers >= 1",
    "a non-empty list of positive integers",
)
ADAM_BETAS = Domain(
    lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)", "a pair in [0, 1)"
)
FINITE_POSITIVE = Domain(lambda v: 0 < v < float("inf"), "a finite number > 0", "finite and positive")
FINITE_NON_NEGATIVE = Domain(lambda v: 0 <= v < float("inf"), "a finite number >= 0", "finite and non-negative")
GUIDANCE_SCALE = FINITE_NON_NEGATIVE.or_null("no guidance").where("0: unconditional, 1: conditional, > 1: guided")
# A Fréchet distance needs a sample covariance and the unbiased MMD / KID pairs of distinct samples: N >= 2.
SAMPLE_COUNT = Domain(lambda v: v >= 2, "an integer >= 2 (a Fréchet distance or an MMD needs two samples)")
# Lightning's seed_everything takes a uint32 (numpy's global seed).
RUN_SEED = Domain(lambda v: 0 <= v < 2**32, f"an integer in [0, {2**32 - 1}]")
# Example i of a job is seeded seed·SEED_STRIDE + i (EDM's per-index seeding) and torch.Generator.manual_seed takes
# at most 2**64 − 1, so seed·SEED_STRIDE + SEED_STRIDE − 1 must stay below 2**64.
SEED_STRIDE = 1_000_003
MAX_JOB_SEED = 2**64 // SEED_STRIDE - 1
JOB_SEED = Domain(
    lambda v: 0 <= v <= MAX_JOB_SEED,
    f"an integer in [0, {MAX_JOB_SEED}] (example i is seeded seed·{SEED_STRIDE} + i, which torch.Generator takes "
    "below 2**64)",
)
# A torch device the job can run on: checked for existence (a GPU is there) before any loading, cli.check_device.
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
DEVICES = ("cpu", "cuda", "cuda:N", "mps")
DEVICE = Domain(lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None, f"one of {list(DEVICES)}")
CLASS_LABELS = Domain(
    lambda v: len(v) >= 1 and all(c >= 0 for c in v),
    "null (every class) or a non-empty list of labels 0..num_classes − 1",
)

# A run's name is one folder under the output root (hydra.run.dir outputs/${name}/…, multirun/${name}/…): a word
# character first, then word characters, '.', '+', '-'; no '/' (no subfolders), so it never names '..', '/abs'.
_RUN_NAME = re.compile(r"\w[\w.+-]{0,127}")
RUN_NAME = Domain(
    lambda v: isinstance(v, str) and _RUN_NAME.fullmatch(v) is not None,
    "one folder name under the output root: 1-128 letters, digits, '_', '.', '+', '-', not starting with '.', '+' "
    "or '-'; no '/' (no subfolders, no '..', no absolute path)",
    "a safe run name",
)
