"""YOLOv3 loss: target assignment, box regression (CIoU/GIoU), objectness and class BCE.

Assignment rule (shape-ratio matching in the centre cell):
    A ground-truth box is a positive for every anchor, at every scale, whose width and height
    are both within a factor ``anchor_t`` (default 4) of the box's:
    ``max(w / a_w, a_w / w, h / a_h, a_h / h) < anchor_t``. Its best-matching anchor over all
    scales (highest width/height IoU, boxes aligned at a corner) is always a positive too, so
    very small or very large boxes are never left without one. At each scale the positive is
    the grid cell that contains the box centre (Darknet decoding ``sigmoid(t) + cell`` cannot
    reach outside that cell). This is the ultralytics YOLOv3/v5 rule without the neighbour
    cells; compared with Darknet's "single best anchor, ignore predictions with IoU > 0.7" it
    gives several positives per object, which trains faster, and no ignore zone is needed.

Losses, per image ``i``:
    box_i = mean over i's positives of ``1 - CIoU`` (or ``1 - GIoU``) between the decoded
            prediction and its box (0 when ``i`` has no boxes);
    obj_i = sum over scales of ``balance[s] * mean over cells/anchors of BCE(obj, target)``,
            target ``(1 - iou_ratio) + iou_ratio * IoU`` at positives (IoU of the decoded
            prediction with its box, detached, clamped at 0; ``iou_ratio`` = 1 by default) and
            0 elsewhere;
    cls_i = mean over i's positives and classes of ``BCE(cls, one-hot)``;
    loss_i = box_gain * box_i + obj_gain * obj_i + cls_gain * cls_i.
The returned total is ``mean_i loss_i``: a mean over images of per-image losses, never
normalised by a batch-wide count, so averaging gradients over ``k`` ranks with batch ``b``
equals one process with batch ``k * b``. (ultralytics' YOLOv3 loss is this times the batch
size; scale the learning rate accordingly when porting its hyper-parameters.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

from hvd_yolo.model.yolov3 import box_from_raw

# Objectness weight per stride: finer grids have more cells, each carrying less signal.
DEFAULT_BALANCE = {8: 4.0, 16: 1.0, 32: 0.4, 64: 0.1}


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (xyxy, ``[n, 4]`` each): ``box_iou(a, b).diagonal()``
    computed with the same operations, in memory linear in ``n`` instead of ``n x n``."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area_a + area_b - inter)


class YoloLoss(nn.Module):
    """``YoloLoss(model)(outputs, targets) -> (total, {"box", "obj", "cls"})``.

    ``targets``: float ``[N, 6]`` rows ``(batch_index, class, x1, y1, x2, y2)`` in input
    pixels. Boxes with zero width or height are ignored. The parts are the weighted per-image
    terms averaged over images (detached, for logging); ``total = box + obj + cls``.
    """

    def __init__(
        self,
        model: nn.Module,
        box_loss: str = "ciou",
        anchor_t: float = 4.0,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        balance: dict[int, float] | None = None,
        label_smoothing: float = 0.0,
        iou_ratio: float = 1.0,
    ):
        super().__init__()
        if box_loss not in ("ciou", "giou"):
            raise ValueError(f"box_loss must be 'ciou' or 'giou', got {box_loss!r}")
        if anchor_t <= 1:
            raise ValueError(f"anchor_t must be > 1, got {anchor_t}")
        self.num_classes = int(model.num_classes)
        self.strides = tuple(int(s) for s in model.strides)
        self.register_buffer("anchors", torch.tensor(model.anchors, dtype=torch.float32))
        self.box_loss, self.anchor_t = box_loss, float(anchor_t)
        self.box_gain, self.obj_gain, self.cls_gain = box_gain, obj_gain, cls_gain
        bal = DEFAULT_BALANCE if balance is None else balance
        missing = [s for s in self.strides if s not in bal]
        if missing:
            raise ValueError(f"balance has no weight for stride(s) {missing}")
        self.balance = [float(bal[s]) for s in self.strides]
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= iou_ratio <= 1.0:
            raise ValueError(f"iou_ratio must be in [0, 1], got {iou_ratio}")
        self.iou_ratio = float(iou_ratio)

    # ------------------------------------------------------------------ assignment
    def assign(self, targets: torch.Tensor, grid_hw: list[tuple[int, int]]):
        """Positives per scale: list of ``(target_row, anchor, gy, gx)`` index tensors."""
        device = targets.device
        na = self.anchors.shape[1]
        wh = targets[:, 4:6] - targets[:, 2:4]  # [N, 2]
        anchors = self.anchors.to(device)  # [S, A, 2]
        flat = anchors.view(-1, 2)  # [S*A, 2]
        # Width/height IoU of each box with each anchor (corner-aligned) -> best anchor overall.
        inter = torch.min(wh[:, None], flat[None]).prod(-1)
        iou = inter / (wh.prod(-1)[:, None] + flat.prod(-1)[None] - inter)
        best = iou.argmax(1) if len(targets) else torch.zeros(0, dtype=torch.long, device=device)
        ratio = wh[:, None] / flat[None]  # [N, S*A, 2]
        match = torch.max(ratio, 1 / ratio).amax(-1) < self.anchor_t
        match[torch.arange(len(targets), device=device), best] = True
        centre = (targets[:, 2:4] + targets[:, 4:6]) / 2
        out = []
        for s, (stride, (gh, gw)) in enumerate(zip(self.strides, grid_hw)):
            t_idx, a_idx = match[:, s * na:(s + 1) * na].nonzero(as_tuple=True)
            cell = (centre[t_idx] / stride).floor().long()
            gx = cell[:, 0].clamp(0, gw - 1)
            gy = cell[:, 1].clamp(0, gh - 1)
            out.append((t_idx, a_idx, gy, gx))
        return out

    # ------------------------------------------------------------------ loss
    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor):
        if len(outputs) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} output maps, got {len(outputs)}")
        p0 = outputs[0]
        batch, device = p0.shape[0], p0.device
        targets = self._check_targets(targets, batch).to(device)
        grid_hw = [(int(p.shape[2]), int(p.shape[3])) for p in outputs]
        positives = self.assign(targets, grid_hw)
        anchors = self.anchors.to(device)

        zeros = torch.zeros(batch, device=device, dtype=torch.float32)
        box_sum, cls_sum, obj_img = zeros.clone(), zeros.clone(), zeros.clone()
        n_pos = zeros.clone()
        for s, (p, (t_idx, a_idx, gy, gx)) in enumerate(zip(outputs, positives)):
            b_idx = targets[t_idx, 0].long()
            obj_target = torch.zeros_like(p[..., 4], dtype=torch.float32)
            if len(t_idx):
                ps = p[b_idx, a_idx, gy, gx].float()  # [n, 5+C]; fp32 under AMP too
                cell = torch.stack((gx, gy), 1).float()
                pbox = box_from_raw(ps[:, :2], ps[:, 2:4], cell, anchors[s, a_idx],
                                    self.strides[s])
                tbox = targets[t_idx, 2:6]
                if self.box_loss == "ciou":
                    lbox = complete_box_iou_loss(pbox, tbox, reduction="none")
                else:
                    lbox = generalized_box_iou_loss(pbox, tbox, reduction="none")
                box_sum = box_sum.index_add(0, b_idx, lbox)
                with torch.no_grad():
                    iou = pairwise_iou(pbox, tbox).clamp(min=0).to(obj_target.dtype)
                obj_target[b_idx, a_idx, gy, gx] = (1.0 - self.iou_ratio) + self.iou_ratio * iou
                if self.num_classes > 1:
                    cls_t = torch.full_like(ps[:, 5:], self.label_smoothing / 2)
                    cls_t[torch.arange(len(t_idx), device=device), targets[t_idx, 1].long()] = \
                        1.0 - self.label_smoothing / 2
                    lcls = F.binary_cross_entropy_with_logits(ps[:, 5:], cls_t, reduction="none")
                    cls_sum = cls_sum.index_add(0, b_idx, lcls.mean(1))
                n_pos = n_pos.index_add(0, b_idx, torch.ones_like(lbox))
            lobj = F.binary_cross_entropy_with_logits(p[..., 4].float(), obj_target,
                                                      reduction="none")
            obj_img = obj_img + self.balance[s] * lobj.flatten(1).mean(1)
        denom = n_pos.clamp(min=1)
        box = self.box_gain * (box_sum / denom)
        cls = self.cls_gain * (cls_sum / denom)
        obj = self.obj_gain * obj_img
        total = (box + obj + cls).mean()
        parts = {"box": box.mean().detach(), "obj": obj.mean().detach(),
                 "cls": cls.mean().detach()}
        return total, parts

    def _check_targets(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        targets = torch.as_tensor(targets, dtype=torch.float32)
        if targets.numel() == 0:
            return targets.reshape(0, 6)
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError("targets must be float [N, 6] rows (batch_index, class, x1, y1, x2, "
                             f"y2), got shape {tuple(targets.shape)}")
        if not torch.isfinite(targets).all():
            raise ValueError("targets contain NaN or inf")
        bi, cls = targets[:, 0], targets[:, 1]
        if (bi < 0).any() or (bi >= batch).any() or (bi != bi.round()).any():
            raise ValueError(f"target batch_index must be integers in [0, {batch}), got "
                             f"{sorted(set(bi.tolist()))}")
        bad = (cls < 0) | (cls >= self.num_classes) | (cls != cls.round())
        if bad.any():
            raise ValueError(f"target class must be an integer in [0, {self.num_classes}), got "
                             f"{sorted(set(cls[bad].tolist()))}")
        keep = (targets[:, 4] > targets[:, 2]) & (targets[:, 5] > targets[:, 3])
        return targets[keep]
