"""A small anchor-free detector (CenterNet-style: heatmap + size + offset at stride 4).

Zhou et al., "Objects as Points", 2019 (arXiv:1904.07850). Plain 3x3 convolutions with BN+ReLU
(depthwise blocks gain little or lose from INT8 on the target CPUs). The config holds every
channel count, so a pruned model is rebuilt from its checkpoint without torch-pruning.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BASE_CHANNELS = (16, 32, 64, 128)  # stem, stride 4, 8, 16
BASE_NECK = 64
STRIDE = 4


@dataclass
class DetectorConfig:
    num_classes: int = 10
    input_size: int = 128
    width: float = 1.0
    depth: int = 1
    # Explicit widths; derived from `width` when empty. Pruning rewrites them.
    channels: list[int] = field(default_factory=list)
    neck: int = 0
    head: int = 0
    # [in, out] channels per conv block path ("stem", "stages.0.1", ..., "out"), written after
    # structured pruning; each entry overrides the widths above for that block.
    layers: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scale = lambda c: max(8, int(round(c * self.width / 8)) * 8)  # noqa: E731
        if not self.channels:
            self.channels = [scale(c) for c in BASE_CHANNELS]
        self.neck = self.neck or scale(BASE_NECK)
        self.head = self.head or scale(BASE_NECK)

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Detector(nn.Module):
    """Input (B, 3, S, S) in [0, 1]; output (B, C + 4, S/4, S/4): class heatmap logits, then
    box width/height and centre offset, both in stride-4 cells."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def block(path: str, cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
            cin, cout = cfg.layers.get(path, (cin, cout))
            return conv_bn(cin, cout, k, s)

        c0, c1, c2, c3 = cfg.channels
        self.stem = block("stem", 3, c0, s=2)  # /2
        self.stages = nn.ModuleList()
        for i, (cin, cout) in enumerate(((c0, c1), (c1, c2), (c2, c3))):  # /4, /8, /16
            blocks = [block(f"stages.{i}.0", cin, cout, s=2)]
            blocks += [block(f"stages.{i}.{j}", cout, cout) for j in range(1, cfg.depth + 1)]
            self.stages.append(nn.Sequential(*blocks))
        n = cfg.neck
        self.lat3, self.lat2 = block("lat3", c3, n, 1), block("lat2", c2, n, 1)
        self.lat1 = block("lat1", c1, n, 1)
        self.smooth2, self.smooth1 = block("smooth2", n, n), block("smooth1", n, n)
        self.head = block("head", n, cfg.head)
        self.out = nn.Conv2d(*cfg.layers.get("out", (cfg.head, cfg.num_classes + 4)), 1)
        nn.init.constant_(self.out.bias[: cfg.num_classes], -2.19)  # prior p=0.1 (focal loss)

    def layer_shapes(self) -> dict[str, list[int]]:
        """[in, out] channels of every conv block, keyed as `DetectorConfig.layers`."""
        shapes = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                path = name.removesuffix(".0") if name != "out" else name
                shapes[path] = [m.in_channels, m.out_channels]
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        f1 = self.stages[0](self.stem(x))  # (B, c1, S/4, S/4)
        f2 = self.stages[1](f1)  # (B, c2, S/8, S/8)
        f3 = self.stages[2](f2)  # (B, c3, S/16, S/16)
        p = self.lat3(f3)
        p = self.smooth2(F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat2(f2))
        p = self.smooth1(F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat1(f1))
        return self.out(self.head(p))


class DetectorWithDecode(nn.Module):
    """The deployable graph: raw maps -> the 4-output detection signature.

    Returns num_detections (B,) int32, boxes (B, K, 4) xyxy in input pixels, scores (B, K),
    classes (B, K) int32; rows past num_detections are padding.
    """

    def __init__(self, model: Detector, max_detections: int = 100, score_floor: float = 0.01):
        super().__init__()
        self.model = model
        self.k = max_detections
        self.score_floor = score_floor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return decode(
            self.model(x),
            self.model.cfg.num_classes,
            self.k,
            self.score_floor,
            float(self.model.cfg.input_size),
        )


def decode(
    raw: torch.Tensor, num_classes: int, k: int, score_floor: float, size: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k class peaks of the heatmap -> boxes, scores, classes (see DetectorWithDecode).

    Written for a short ONNX graph, since at batch 1 the decode's op count costs as much as the
    small convolutions: peaks are found on the logits (sigmoid is monotonic, so the 3x3 peaks are
    the same) and only the k winners go through the sigmoid; class and cell coordinates of a
    flat index come from truncating integer division (indices are never negative).
    """
    _, _, h, w = raw.shape
    logits = raw[:, :num_classes]
    peak = F.max_pool2d(logits, 3, 1, 1) == logits  # 3x3 peak NMS
    top, idx = torch.where(peak, logits, -1e4).flatten(1).topk(k)  # (B, K)
    scores = top.sigmoid()
    classes = torch.div(idx, h * w, rounding_mode="trunc")  # indices are >= 0: no floor fix-up
    pix = idx - classes * (h * w)
    y = torch.div(pix, w, rounding_mode="trunc")
    xy = torch.stack([pix - y * w, y], dim=-1).to(raw.dtype)  # (B, K, 2) cell x, y
    box = raw[:, num_classes : num_classes + 4].flatten(2)  # (B, 4, HW): w, h, dx, dy
    box = box.gather(2, pix.unsqueeze(1).expand(-1, 4, -1)).transpose(1, 2)  # (B, K, 4)
    centre = (xy + box[..., 2:]) * STRIDE
    half = box[..., :2].clamp(min=0.0) * (STRIDE / 2)
    boxes = torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, size)
    num = (scores >= score_floor).sum(dim=1).to(torch.int32)
    return num, boxes, scores, classes.to(torch.int32)


def fold_batchnorm(model: Detector) -> tuple[Detector, int]:
    """An eval-mode copy with every BatchNorm folded into the conv before it (Conv+BN+ReLU ->
    Conv+ReLU), so exported graphs and their INT8 versions carry no BN. Returns (copy, folds)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    count = 0
    for m in folded.modules():
        if isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[1], nn.BatchNorm2d):
            m[0] = fuse_conv_bn_eval(m[0], m[1])
            m[1] = nn.Identity()
            count += 1
    return folded, count


def load_checkpoint(path) -> tuple[Detector, dict]:
    """Rebuild a model from a checkpoint written by `save_checkpoint` (weights_only load).

    Raises:
        DataError: the file is missing, not a torch checkpoint (truncated, foreign, or holding
            objects a weights-only load refuses), or not one of ours.
    """
    from tasks.errors import DataError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:  # noqa: BLE001  (torch raises several types; torch's advice to
        # turn weights_only off would run code from the file: never give it)
        raise DataError(
            f"{path}: not a readable Shrinkflow checkpoint ({type(e).__name__}); "
            "re-create it with the stage that writes it"
        ) from e
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= set(ckpt):
        raise DataError(f"{path}: not a Shrinkflow checkpoint (no config/state_dict)")
    try:
        model = Detector(DetectorConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{path}: checkpoint does not match its config: {first}") from e
    model.eval()
    return model, ckpt


def macs_and_params(model: Detector) -> tuple[int, int]:
    """MACs at the configured input size and parameter count (torch-pruning's counter)."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, model.cfg.input_size, model.cfg.input_size)
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs), int(params)
