"""Stage `label_qa`: find label errors, show them, clean the manifest `train` reads, and gate.

Rules are registered by name with a severity and a default policy (`registry.py`): structural box
rules (`boxes.py`), image rules incl. perceptual-hash duplicates and split leakage (`images.py`),
class balance (`balance.py`) and model-based checks with cleanlab's ObjectLab on out-of-sample
predictions (`model_checks.py`, with a colour-aware box classifier in `box_classifier.py`).
`probe.py` measures each model rule on errors injected into a copy of train, and only a proven
rule may change labels; `review.py` exports findings for review and applies a reviewer's
decisions. `core.run` applies them and the policy; `report.py` writes the JSON / Markdown reports
with crops; `python -m tasks.label_qa` is the DVC entry point.
"""

from tasks.label_qa.core import QaResult, apply_policy, run
from tasks.label_qa.registry import RULES, SPLITS, Finding, Hit, Rule

__all__ = ["RULES", "SPLITS", "Finding", "Hit", "QaResult", "Rule", "apply_policy", "run"]
