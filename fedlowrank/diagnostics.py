"""Did a run learn? A run can finish with exit 0 and a plot while its model predicts one class for everything
(a learning rate too high for the task, or too few steps). The final evaluation says so plainly:

- *collapsed*: at least ``COLLAPSE_SHARE`` of the test predictions fall in one class, on a test set with more
  than one label;
- *not learned*: the test loss is no lower than the label entropy H(y), the loss of the best prediction that
  ignores the input (within ``PRIOR_MARGIN``).
"""

from __future__ import annotations

import math
from typing import Any

COLLAPSE_SHARE = 0.98
PRIOR_MARGIN = 0.02  # relative: a loss above 98 % of H(y) has learned next to nothing from the inputs


def learning_warning(final: dict[str, Any], lr: float, lr_key: str = "train.lr") -> str | None:
    """A one-paragraph warning when the final metrics row ``final`` shows a run that did not learn, else None."""
    share, entropy, loss = (final.get(f"test_{key}") for key in ("top_class_share", "label_entropy", "loss"))
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (share, entropy, loss)) or entropy <= 0:
        return None
    symptoms = []
    if share >= COLLAPSE_SHARE:
        symptoms.append(f"{share:.0%} of its test predictions are one class (accuracy {final.get('test_accuracy')})")
    if loss >= (1 - PRIOR_MARGIN) * entropy:
        symptoms.append(
            f"its test loss {loss:.3f} is no better than {entropy:.3f}, the label entropy (what predicting the "
            "class frequencies without reading the input scores)"
        )
    if not symptoms:
        return None
    # both ways lead here: too high a rate collapses a model to one class, too low a rate never leaves the prior
    fix = f"another learning rate ({lr_key} is {lr:g}; try {lr / 5:g} and {lr * 5:g}) or more rounds or local steps"
    return (
        f"the model has not learned: {'; and '.join(symptoms)}. Likely fix: {fix}; `fedlowrank tune` finds a rate "
        "on the clients' validation data (never the test set)."
    )
