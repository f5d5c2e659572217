"""The built-in detector: a small anchor-free CenterNet-style model (heatmap + size + offset at
stride 4), and its adapter (`family: centernet`).

Zhou et al., "Objects as Points", 2019 (arXiv:1904.07850). Plain 3x3 convolutions with BN+ReLU
(depthwise blocks gain little or lose from INT8 on the target CPUs). The config holds every
channel count, so a pruned model is rebuilt from its checkpoint without torch-pruning.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.harness.errors import DataError
from tasks.models.base import PruneSpec
from tasks.models.checkpoint import write_checkpoint
from tasks.models.config import CenterNetCfg, ModelCfg
from tasks.preprocess.letterbox import input_wh

BASE_CHANNELS = (16, 32, 64, 128)  # stem, stride 4, 8, 16
BASE_NECK = 64
STRIDE = 4
INPUT_STRIDE = 16  # the deepest feature map (S/16) is upsampled x2 twice onto S/8 and S/4


@dataclass
class DetectorConfig:
    num_classes: int = 10
    input_size: int | list[int] = 128  # a side (square) or [width, height]
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

    @property
    def wh(self) -> tuple[int, int]:
        """(width, height) of the input."""
        return input_wh(self.input_size)

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Detector(nn.Module):
    """Input (B, 3, H, W) in [0, 1] (H, W multiples of 16); output (B, C + 4, H/4, W/4): class
    heatmap logits, then box width/height and centre offset, both in stride-4 cells."""

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
            self.model.cfg.wh,
        )


def decode(
    raw: torch.Tensor, num_classes: int, k: int, score_floor: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k class peaks of the heatmap -> boxes, scores, classes (see DetectorWithDecode).

    Written for a short ONNX graph, since at batch 1 the decode's op count costs as much as the
    small convolutions: peaks are found on the logits (sigmoid is monotonic, so the 3x3 peaks are
    the same) and only the k winners go through the sigmoid; class and cell coordinates of a
    flat index come from truncating integer division (indices are never negative). Boxes are
    clipped to the input, `size` = (width, height).
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
    boxes = torch.cat([centre - half, centre + half], dim=-1)
    iw, ih = size
    if iw == ih:
        boxes = boxes.clamp(0.0, float(iw))
    else:
        limit = torch.tensor([iw, ih, iw, ih], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0.0), limit)
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


def make_targets(
    boxes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, size: int | tuple[int, int]
):
    """CenterNet targets on the stride-4 grid of an input `size` = (width, height).

    Returns heat (B, C, H, W) with an elliptical Gaussian per object (TTFNet, arXiv:1909.00700),
    reg (B, 4, H, W) = box w, h and centre offset in cells, mask (B, H, W) = 1 at object centres.
    """
    w, h = (side // STRIDE for side in input_wh(size))
    b = len(boxes)
    heat = np.zeros((b, num_classes, h, w), np.float32)
    reg = np.zeros((b, 4, h, w), np.float32)
    mask = np.zeros((b, h, w), np.float32)
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        for (x0, y0, x1, y1), c in zip(bx / STRIDE, lb, strict=True):
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            sx, sy = max(bw * 0.54 / 6, 0.5), max(bh * 0.54 / 6, 0.5)
            g = np.exp(-((xs - ix) ** 2) / (2 * sx**2) - ((ys - iy) ** 2) / (2 * sy**2))
            np.maximum(heat[i, c], g, out=heat[i, c])
            reg[i, :, iy, ix] = (bw, bh, cx - ix, cy - iy)
            mask[i, iy, ix] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def detection_loss(raw: torch.Tensor, heat, reg, mask, num_classes: int) -> torch.Tensor:
    """Penalty-reduced focal loss on the heatmap + L1 on size (x0.1) and offset at centres."""
    logits = raw[:, :num_classes].float()
    pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg_w = (1 - heat).pow(4)
    pos_loss = (pos * (1 - pred).pow(2) * torch.log(pred)).sum()
    neg_loss = ((1 - pos) * neg_w * pred.pow(2) * torch.log(1 - pred)).sum()
    n = mask.sum().clamp(min=1)
    focal = -(pos_loss + neg_loss) / n
    r = raw[:, num_classes : num_classes + 4].float()
    m = mask.unsqueeze(1)
    size_l1 = (F.l1_loss(r[:, :2], reg[:, :2], reduction="none") * m).sum() / n
    off_l1 = (F.l1_loss(r[:, 2:], reg[:, 2:], reduction="none") * m).sum() / n
    return focal + 0.1 * size_l1 + off_l1


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    num_classes: int,
    temperature: float,
    cls_weight: float,
    box_weight: float,
) -> torch.Tensor:
    """Distillation loss between raw maps (B, C + 4, H, W) of student and teacher."""
    t = temperature
    s_logits, t_logits = student[:, :num_classes].float(), teacher[:, :num_classes].float()
    soft = torch.sigmoid(t_logits / t)
    # Bernoulli KL(teacher || student) per pixel and class = BCE minus the target's entropy
    # (so a perfect student scores 0); summed over classes, averaged over pixels, times T^2.
    bce = F.binary_cross_entropy_with_logits(s_logits / t, soft, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(t_logits / t, soft, reduction="none")
    heat = (bce - entropy).sum(1).mean() * t * t
    confidence = torch.sigmoid(t_logits).amax(1, keepdim=True)  # (B, 1, H, W)
    reg = (student[:, num_classes:].float() - teacher[:, num_classes:].float()).abs()
    reg = (reg * confidence).sum() / confidence.sum().clamp(min=1)
    return cls_weight * heat + box_weight * reg


def macs_and_params(model: nn.Module, input_size: int | tuple[int, int]) -> tuple[int, int]:
    """MACs at `input_size` (width, height) for batch 1 and parameter count (torch-pruning's
    counter)."""
    import torch_pruning as tp

    w, h = input_wh(input_size)
    example = torch.zeros(1, 3, h, w)
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs), int(params)


class CenterNetAdapter:
    """`ModelAdapter` of the built-in detector (see tasks/models/base.py)."""

    family = "centernet"
    input_stride = INPUT_STRIDE

    def __init__(self, cfg: CenterNetCfg) -> None:
        self.cfg = cfg

    def build(self, num_classes: int, input_size: int | tuple[int, int], seed: int) -> Detector:
        torch.manual_seed(seed)  # the initial weights
        w, h = input_wh(input_size)
        side = w if w == h else [w, h]  # a square stays one side in the checkpoint
        return Detector(DetectorConfig(num_classes, side, self.cfg.width, self.cfg.depth))

    def save(self, path: Path, model: Detector, categories: list[dict], extra: dict) -> None:
        write_checkpoint(
            path,
            {
                "family": self.family,
                "config": model.cfg.to_dict(),
                "state_dict": model.state_dict(),
                "categories": categories,
                **extra,
            },
        )

    def load(self, ckpt: dict, path: Path) -> Detector:
        try:
            model = Detector(DetectorConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["state_dict"])
        except (TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{path}: checkpoint does not match its config: {first}") from e
        return model.eval()

    def input_size(self, model: Detector) -> tuple[int, int]:
        return model.cfg.wh

    def num_classes(self, model: Detector) -> int:
        return model.cfg.num_classes

    def forward_train(self, model: Detector, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def loss(self, model: Detector, raw, boxes, labels) -> torch.Tensor:
        heat, reg, mask = (
            t.to(raw.device)
            for t in make_targets(boxes, labels, model.cfg.num_classes, model.cfg.wh)
        )
        return detection_loss(raw, heat, reg, mask, model.cfg.num_classes)

    def kd_loss(self, student_raw, teacher_raw, temperature, cls_weight, box_weight):
        num_classes = student_raw.shape[1] - 4
        return kd_loss(student_raw, teacher_raw, num_classes, temperature, cls_weight, box_weight)

    def prunable(self, model: Detector) -> list[str]:
        return list(model.layer_shapes())

    def prune_spec(self, model: Detector, ignore: list[str]) -> PruneSpec:
        # `out` holds the class and box channels: its outputs are the detector's meaning
        return PruneSpec(ignored_layers=[model.get_submodule(p) for p in {*ignore, "out"}])

    def after_prune(self, model: Detector) -> None:
        model.cfg.layers = model.layer_shapes()

    def deployable(
        self, model: Detector, max_detections: int, score_floor: float, fold: bool = True
    ) -> nn.Module:
        base = fold_batchnorm(model)[0] if fold else copy.deepcopy(model).eval()
        return DetectorWithDecode(base, max_detections, score_floor).eval()

    def macs_and_params(self, model: Detector) -> tuple[int, int]:
        return macs_and_params(model, model.cfg.wh)


def adapter(cfg: ModelCfg) -> CenterNetAdapter:
    return CenterNetAdapter(cfg.centernet)
