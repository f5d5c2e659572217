"""The deployed model's signature, the one vocabulary every exporter, engine and metric shares.

Every ONNX the pipeline builds takes float32 `images` (B, 3, H, W) in [0, 1] and ends in
`OUTPUTS`: num_detections (B,) int32, boxes (B, K, 4) xyxy in input pixels, scores (B, K),
classes (B, K) int32. A `Runner` is anything that maps such a batch to those four arrays: an
engine's compiled model, eager PyTorch behind the family's decode, the served pyfunc.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

INPUT = "images"
OUTPUTS = ["num_detections", "boxes", "scores", "classes"]

Runner = Callable[[np.ndarray], Sequence[np.ndarray]]
