"""YOLOv3 (Darknet-53 backbone, three scales) and YOLOv3-tiny, built layer by layer like Darknet.

The network is a list of layers in exactly the order of Darknet's ``yolov3.cfg`` /
``yolov3-tiny.cfg`` (conv, shortcut, route, upsample, maxpool, yolo), so ``model.layers[i]`` is
cfg layer ``i``. That keeps the ``.weights`` order trivially right (see ``darknet_io``) and
makes Darknet's partial files (``darknet53.conv.74``: cfg layers 0..73) a simple cutoff.

Input: float ``[B, 3, H, W]`` RGB in 0..1 with ``H`` and ``W`` divisible by 32 (any size,
square or not). Output: a list with one raw map per scale, **large stride first** (32, 16, 8 for
YOLOv3; 32, 16 for tiny), each ``[B, A, H/s, W/s, 5 + C]`` holding ``(tx, ty, tw, th, obj,
cls...)`` logits. Boxes decode Darknet's way (``box_from_raw``): centre ``(sigmoid(t) + cell) *
stride``, size ``exp(t) * anchor``, so published Darknet weights work unchanged. Anchors are in
input pixels and, as in Darknet and ultralytics, the same at every input size; the defaults are
those of the official cfgs (``DEFAULT_ANCHORS``), ``build_model(..., anchors=...)`` sets others
(``model.anchors`` in a config; ``hvd-yolo anchors`` computes them from a dataset).

Over 350 lines on purpose: one job, YOLOv3 and YOLOv3-tiny; the layer list in cfg order, the
forward over it and the activation-checkpoint segments cut from it are one definition of the
network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as checkpoint_segment

# The model's names, modes and official anchors (and their check) live in config.
from hvd_yolo.config import CHECKPOINT_MODES, check_anchors, resolve_anchors

MAX_STRIDE = 32
WH_LOG_CLAMP = math.log(1000.0)  # exp(t) is clamped to 1000x the anchor (avoids inf early on)
LEAKY_SLOPE = 0.1
BN_EPS = 1e-5
BN_MOMENTUM = 0.03

# A layer spec mirrors one cfg section: ("conv", filters, size, stride, batch_normalize),
# ("shortcut", from), ("route", (layers...)), ("upsample", 2), ("maxpool", size, stride),
# ("yolo", scale_index). A conv with batch_normalize=False is the linear detection conv.
LayerSpec = tuple


def _darknet53_specs() -> list[LayerSpec]:
    """cfg layers 0..74 of yolov3.cfg: Darknet-53 without its classifier (52 convs)."""
    specs: list[LayerSpec] = [("conv", 32, 3, 1, True)]
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        specs.append(("conv", filters, 3, 2, True))
        for _ in range(blocks):
            specs += [("conv", filters // 2, 1, 1, True), ("conv", filters, 3, 1, True),
                      ("shortcut", -3)]
    return specs


def _yolov3_specs(out_filters: int) -> list[LayerSpec]:
    specs = _darknet53_specs()  # 0..74; layer 36 = stride-8 features, 61 = stride-16 features
    for i, (filters, route_from) in enumerate(((512, None), (256, 61), (128, 36))):
        if route_from is not None:
            specs += [("route", (-4,)), ("conv", filters, 1, 1, True), ("upsample", 2),
                      ("route", (-1, route_from))]
        for _ in range(3):
            specs += [("conv", filters, 1, 1, True), ("conv", filters * 2, 3, 1, True)]
        specs += [("conv", out_filters, 1, 1, False), ("yolo", i)]
    return specs


def _yolov3_tiny_specs(out_filters: int) -> list[LayerSpec]:
    specs: list[LayerSpec] = []
    for filters in (16, 32, 64, 128, 256):
        specs += [("conv", filters, 3, 1, True), ("maxpool", 2, 2)]
    specs += [("conv", 512, 3, 1, True), ("maxpool", 2, 1), ("conv", 1024, 3, 1, True),
              ("conv", 256, 1, 1, True), ("conv", 512, 3, 1, True),
              ("conv", out_filters, 1, 1, False), ("yolo", 0),
              ("route", (-4,)), ("conv", 128, 1, 1, True), ("upsample", 2), ("route", (-1, 8)),
              ("conv", 256, 3, 1, True), ("conv", out_filters, 1, 1, False), ("yolo", 1)]
    return specs


class ConvLayer(nn.Module):
    """Darknet ``[convolutional]``: conv + BN + leaky(0.1), or conv with bias and no activation."""

    def __init__(self, c_in: int, c_out: int, size: int, stride: int, batch_normalize: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, size, stride, padding=size // 2,
                              bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM) if batch_normalize \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = F.leaky_relu(self.bn(x), LEAKY_SLOPE)
        return x


class Shortcut(nn.Module):
    """Darknet ``[shortcut] from=k``: add the output of layer ``i + k`` (linear activation)."""

    def __init__(self, source: int):
        super().__init__()
        self.sources = (source,)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return x + other


class Route(nn.Module):
    """Darknet ``[route]``: concatenate the listed layers' outputs along channels."""

    def __init__(self, sources: tuple[int, ...]):
        super().__init__()
        self.sources = sources

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Upsample(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")


class MaxPool(nn.Module):
    """Darknet ``[maxpool]``; size 2 stride 1 keeps the size (pads right/bottom like Darknet)."""

    def __init__(self, size: int, stride: int):
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            # Darknet pads with -inf; replicating the edge gives the same maxima.
            x = F.pad(x, (0, self.size - 1, 0, self.size - 1), mode="replicate")
        return F.max_pool2d(x, self.size, self.stride)


class YoloLayer(nn.Module):
    """Darknet ``[yolo]``: reshape ``[B, A*(5+C), h, w]`` to ``[B, A, h, w, 5+C]`` (raw)."""

    def __init__(self, scale: int, num_anchors: int, num_outputs: int, stride: int):
        super().__init__()
        self.scale, self.num_anchors, self.num_outputs, self.stride = (
            scale, num_anchors, num_outputs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return x.view(b, self.num_anchors, self.num_outputs, h, w).permute(0, 1, 3, 4, 2) \
            .contiguous()


class YOLOv3(nn.Module):
    """A Darknet-ordered YOLO network; build it with ``build_model``.

    Attributes: ``name``, ``num_classes``, ``strides`` (per output, large first), ``anchors``
    (per output, a list of ``(w, h)`` pixel pairs; the buffer ``anchor_wh`` ``[num_scales, A,
    2]`` holds them with the weights), ``layers`` (cfg order),
    ``backbone_cutoff`` (cfg layers in Darknet's backbone-only file: 74 or 15),
    ``layer_strides`` (downsampling factor of each layer's output).
    """

    def __init__(self, name: str, num_classes: int, specs: list[LayerSpec],
                 anchors: Sequence[Sequence[Sequence[float]]], backbone_cutoff: int):
        super().__init__()
        self.name, self.num_classes, self.backbone_cutoff = name, num_classes, backbone_cutoff
        anchor_t = torch.tensor(check_anchors(anchors), dtype=torch.float32)
        # Kept with the weights (state_dict key "anchor_wh"): a checkpoint holds the anchors its
        # weights were trained with.
        self.register_buffer("anchor_wh", anchor_t)
        num_anchors = anchor_t.shape[1]
        channels: list[int] = []
        factors: list[int] = []  # downsampling factor of each layer's output
        layers: list[nn.Module] = []
        strides: dict[int, int] = {}
        c, f = 3, 1
        for i, spec in enumerate(specs):
            kind = spec[0]
            if kind == "conv":
                _, filters, size, stride, bn = spec
                layers.append(ConvLayer(c, filters, size, stride, bn))
                c, f = filters, f * stride
            elif kind == "shortcut":
                layers.append(Shortcut(i + spec[1]))
            elif kind == "route":
                sources = tuple(i + s if s < 0 else s for s in spec[1])
                layers.append(Route(sources))
                c = sum(channels[s] for s in sources)
                f = factors[sources[0]]
                if any(factors[s] != f for s in sources):
                    raise ValueError(f"route at layer {i} mixes strides {sources}")
            elif kind == "upsample":
                layers.append(Upsample(spec[1]))
                f //= spec[1]
            elif kind == "maxpool":
                layers.append(MaxPool(spec[1], spec[2]))
                f *= spec[2]
            elif kind == "yolo":
                if c != num_anchors * (5 + num_classes):
                    raise ValueError(f"yolo layer {i}: {c} channels, expected "
                                     f"{num_anchors * (5 + num_classes)}")
                layers.append(YoloLayer(spec[1], num_anchors, 5 + num_classes, f))
                strides[spec[1]] = f
            else:
                raise ValueError(f"unknown layer kind {kind!r} at {i}")
            channels.append(c)
            factors.append(f)
        if sorted(strides) != list(range(anchor_t.shape[0])):
            raise ValueError(f"{name}: {len(strides)} yolo layers but anchors for "
                             f"{anchor_t.shape[0]} scales")
        self.layers = nn.ModuleList(layers)
        self.layer_strides: tuple[int, ...] = tuple(factors)  # downsampling of each output
        self.strides: tuple[int, ...] = tuple(strides[s] for s in range(len(strides)))
        # Outputs of these layers are needed later (shortcut/route sources).
        self._keep = {s for m in layers for s in getattr(m, "sources", ()) if s != -1}
        self._init_biases()
        self.set_checkpoint("none")

    def set_checkpoint(self, mode: str) -> None:
        """Activation checkpointing ``mode`` (``CHECKPOINT_MODES``), used in training with grad.

        The layers are cut into segments; a checkpointed segment keeps only its inputs in the
        forward and recomputes its activations in the backward (``torch.utils.checkpoint``,
        non-reentrant: the autograd graph, so each parameter's gradient hook, is the usual one).
        Backbone segments end at each residual shortcut (tiny: each maxpool) and at the backbone's
        last layer; with ``all`` the neck/head segments end at each 3x3 conv and the last layer.
        """
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"model.checkpoint={mode!r}: must be one of "
                             f"{', '.join(CHECKPOINT_MODES)}")
        self.checkpoint = mode
        n, cut = len(self.layers), self.backbone_cutoff
        ends = []
        for i, m in enumerate(self.layers):
            if i < cut:
                end = isinstance(m, (Shortcut, MaxPool)) or i == cut - 1
            else:
                end = i == n - 1 or (isinstance(m, ConvLayer) and m.conv.kernel_size[0] == 3)
            if end:
                ends.append(i + 1)
        segments: list[tuple[int, int, bool]] = []
        start = 0
        for end in ends:
            segments.append((start, end, mode == "all" or (mode == "backbone" and end <= cut)))
            start = end
        self._segments = [(a, b, ck, *self._segment_io(a, b)) for a, b, ck in segments]

    def _segment_io(self, start: int, end: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(kept outputs from before ``start`` the segment reads, kept outputs it makes that
        layers from ``end`` on read)."""
        reads = sorted({s for m in list(self.layers)[start:end] for s in getattr(m, "sources", ())
                        if s < start})
        later = {s for m in list(self.layers)[end:] for s in getattr(m, "sources", ())}
        return tuple(reads), tuple(i for i in range(start, end) if i in later)

    @property
    def anchors(self) -> list[list[tuple[float, float]]]:
        """Per output (large stride first), the ``(w, h)`` anchors in input pixels."""
        return [[(float(w), float(h)) for w, h in scale] for scale in self.anchor_wh.tolist()]

    @property
    def num_anchors(self) -> int:
        return int(self.anchor_wh.shape[1])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints written before the anchors were named "anchor_wh" call them "anchors".
        if prefix + "anchors" in state_dict and prefix + "anchor_wh" not in state_dict:
            state_dict[prefix + "anchor_wh"] = state_dict.pop(prefix + "anchors")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_biases(self) -> None:
        """Detection-conv bias priors (ultralytics): ~8 objects per 640² image, p(cls)≈0.6/C."""
        for i, m in enumerate(self.layers):
            if isinstance(m, YoloLayer):
                conv = self.layers[i - 1].conv
                b = conv.bias.detach().view(m.num_anchors, -1)
                b[:, 4] = math.log(8 / (640 / m.stride) ** 2)
                b[:, 5:] = math.log(0.6 / max(self.num_classes - 0.99, 0.01))

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects a float tensor [B, 3, H, W], got shape "
                             f"{tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % MAX_STRIDE or w % MAX_STRIDE or h == 0 or w == 0:
            raise ValueError(
                f"{self.name}: input size {h}x{w} is not divisible by {MAX_STRIDE}; use a "
                f"multiple of {MAX_STRIDE} such as {max(MAX_STRIDE, round(h / 32) * 32)}x"
                f"{max(MAX_STRIDE, round(w / 32) * 32)} (letterbox the images to that size)")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        kept: dict[int, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        if self.checkpoint == "none" or not (self.training and torch.is_grad_enabled()):
            self._run(0, len(self.layers), x, kept, outputs)
            return outputs
        for start, end, ckpt, reads, makes in self._segments:
            if not ckpt:
                x = self._run(start, end, x, kept, outputs)
                continue
            res = checkpoint_segment(
                self._segment_fn(start, end, reads, makes), x, *(kept[s] for s in reads),
                use_reentrant=False, context_fn=lambda a=start, b=end: (
                    nullcontext(), self._restore_buffers(a, b)))
            x = res[0]
            kept.update(zip(makes, res[1:1 + len(makes)]))
            outputs += res[1 + len(makes):]
        return outputs

    def _run(self, start: int, end: int, x: torch.Tensor, kept: dict[int, torch.Tensor],
             outputs: list[torch.Tensor]) -> torch.Tensor:
        """Layers ``start .. end-1`` on ``x``: fills ``kept`` and ``outputs``, returns the last x."""
        for i in range(start, end):
            layer = self.layers[i]
            if isinstance(layer, Shortcut):
                x = layer(x, kept[layer.sources[0]])
            elif isinstance(layer, Route):
                x = layer(*(kept[s] for s in layer.sources))
            elif isinstance(layer, YoloLayer):
                outputs.append(layer(x))
            else:
                x = layer(x)
            if i in self._keep:
                kept[i] = x
        return x

    def _segment_fn(self, start: int, end: int, reads: tuple[int, ...], makes: tuple[int, ...]):
        def run_segment(x: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            kept, outputs = dict(zip(reads, inputs)), []
            x = self._run(start, end, x, kept, outputs)
            return (x, *(kept[i] for i in makes), *outputs)
        return run_segment

    @contextmanager
    def _restore_buffers(self, start: int, end: int) -> Iterator[None]:
        """Around a segment's recomputation: BatchNorm's running statistics (updated once, in
        the forward) are put back, so checkpointing changes no buffer."""
        buffers = [b for m in list(self.layers)[start:end] for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)

    def output_shapes(self, height: int, width: int, batch: int = 1) -> list[tuple[int, ...]]:
        """Shapes ``forward`` returns for an input ``[batch, 3, height, width]``."""
        self.check_input(torch.empty(0, 3, height, width, device="meta"))
        return [(batch, self.num_anchors, height // s, width // s, 5 + self.num_classes)
                for s in self.strides]

    def flops(self, height: int, width: int) -> int:
        """Convolution FLOPs (2 x multiply-accumulates) of one image, as Darknet counts them."""
        return sum(2 * m.conv.weight.numel() * (height // f) * (width // f)
                   for m, f in zip(self.layers, self.layer_strides) if isinstance(m, ConvLayer))

    def conv_layers(self, cutoff: int | None = None) -> list[ConvLayer]:
        """The conv layers among cfg layers ``0 .. cutoff-1`` (all when None), in Darknet order."""
        n = len(self.layers) if cutoff is None else cutoff
        return [m for m in list(self.layers)[:n] if isinstance(m, ConvLayer)]


def box_from_raw(t_xy: torch.Tensor, t_wh: torch.Tensor, cell_xy: torch.Tensor,
                 anchor_wh: torch.Tensor, stride: float) -> torch.Tensor:
    """Darknet decoding to xyxy input pixels: centre ``(sigmoid(t)+cell)*s``, size ``e^t*anchor``."""
    xy = (t_xy.sigmoid() + cell_xy) * stride
    wh = t_wh.clamp(max=WH_LOG_CLAMP).exp() * anchor_wh
    return torch.cat((xy - wh / 2, xy + wh / 2), -1)


def anchors_in_weights(weights: dict) -> list[list[tuple[float, float]]] | None:
    """The anchors a model's ``state_dict`` holds (also under the key older checkpoints used),
    or None when it holds none."""
    t = weights.get("anchor_wh", weights.get("anchors"))
    return None if t is None else [[(float(w), float(h)) for w, h in s] for s in t.tolist()]


def build_model(
    name: str,
    num_classes: int,
    anchors: Sequence[Sequence[Sequence[float]]] | None = None,
    checkpoint: str = "none",
) -> YOLOv3:
    """``"yolov3"`` or ``"yolov3-tiny"`` for ``num_classes`` classes.

    ``anchors``: one entry per output, in output order (large stride first), each a list of
    ``(w, h)`` input-pixel pairs; None (or empty): the official cfg's (``DEFAULT_ANCHORS``).
    ``checkpoint``: see ``YOLOv3.set_checkpoint``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    anchors = resolve_anchors(name, anchors)
    specs_fn, cutoff = {"yolov3": (_yolov3_specs, 74), "yolov3-tiny": (_yolov3_tiny_specs, 15)}[name]
    num_anchors = len(anchors[0])
    model = YOLOv3(name, num_classes, specs_fn(num_anchors * (5 + num_classes)), anchors, cutoff)
    model.set_checkpoint(checkpoint)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
