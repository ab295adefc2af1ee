"""Backbones with a timm-like API: `forward_features` (pooled features, (B, F)), `forward_head`,
`reset_head`, so stage 2 swaps the 40-attribute head for the embedding head without editing the model.

- `seed-cnn`: the student project's 6-conv Keras network, kept as the baseline it was meant to be.
- `resnet`: a compact residual network sized for CPU (the default, a few M parameters).
- `inception-resnet-v1`: facenet-pytorch's network (random init; pretrained weights need internet).
- `dlib-resnet`: dlib's 29-layer face-recognition ResNet, rebuilt layer for layer; its weights come
  from dlib's own file (`verify.model.dlib_import`), never from training here.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn

from verify.model.heads import make_head

log = logging.getLogger(__name__)

BACKBONES = ("seed-cnn", "resnet", "inception-resnet-v1", "dlib-resnet")


class Backbone(nn.Module):
    """Base class: subclasses build `self.stages` (a ModuleList) and `self.neck` ((B,C,h,w) -> (B,F))."""

    num_features: int
    head_kind: str = "none"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,F)
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_head(self, kind: str, out_dim: int = 0, dropout: float = 0.0) -> None:
        """Replace the head: `attributes` (logits), `embedding` (L2-normalised) or `none`."""
        self.head = make_head(kind, self.num_features, out_dim, dropout)
        self.head_kind = kind

    def freeze_stages(self, n: int) -> None:
        """Freeze the first n stages (parameters and BatchNorm statistics)."""
        if n > len(self.stages):
            raise ValueError(f"cannot freeze {n} stages: the backbone has {len(self.stages)}")
        for stage in list(self.stages)[:n]:
            stage.requires_grad_(False)
        self._frozen = n

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for stage in list(self.stages)[: getattr(self, "_frozen", 0)]:
            stage.eval()  # frozen BN keeps its running statistics
        return self


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeedCNN(Backbone):
    """The original: conv(16)-conv(16)-pool-conv(32)-conv(32)-pool-conv(64)-conv(64)-pool, 3x3, ReLU,
    flatten, dense. Plain convolutions (no BatchNorm), as the student project had them."""

    def __init__(self, input_size: int = 192, feature_dim: int = 256) -> None:
        super().__init__()
        chans = (16, 16, 32, 32, 64, 64)
        stages, cin = [], 3
        for i in range(0, 6, 2):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, chans[i], 3, padding=1), nn.ReLU(inplace=True),
                    nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            cin = chans[i + 1]
        self.stages = nn.ModuleList(stages)
        side = input_size // 8
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, feature_dim), nn.ReLU(inplace=True))
        self.num_features = feature_dim
        self.head = nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.short(x))


class CompactResNet(Backbone):
    """A small ResNet for CPU: stem (stride 2), 4 stages (x1, x2, x4, x8 width; stride 1,2,2,2), then
    the face-recognition 'output layer' BN -> dropout -> flatten -> FC -> BN, which keeps the spatial
    layout (eyes vs mouth) that global pooling would throw away."""

    def __init__(
        self,
        input_size: int = 112,
        width: int = 32,
        layers: Sequence[int] = (1, 2, 2, 1),
        feature_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem = _conv_bn_relu(3, width, stride=2)
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(layers):
            cout = width * (2**i)
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks) if i else nn.Sequential(stem, *blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        side = input_size
        for _ in range(len(layers)):
            side = (side + 1) // 2  # stem + 3 strided stages
        self.neck = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(cin * side * side, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
        )
        self.num_features = feature_dim
        self.head = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class InceptionResnetBackbone(Backbone):
    """facenet-pytorch's InceptionResnetV1; features are its 512-d bottleneck (before normalising)."""

    def __init__(self, pretrained: str | None = None, dropout: float = 0.6) -> None:
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        try:
            net = InceptionResnetV1(pretrained=pretrained, classify=False, dropout_prob=dropout)
        except Exception as e:  # urllib/HTTP errors when offline
            if pretrained is None:
                raise
            raise RuntimeError(
                f"InceptionResnetV1(pretrained={pretrained!r}) needs to download its weights and failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); use pretrained: null offline"
            ) from None
        self.stages = nn.ModuleList(
            [
                nn.Sequential(net.conv2d_1a, net.conv2d_2a, net.conv2d_2b, net.maxpool_3a),
                nn.Sequential(net.conv2d_3b, net.conv2d_4a, net.conv2d_4b),
                nn.Sequential(net.repeat_1, net.mixed_6a),
                nn.Sequential(net.repeat_2, net.mixed_7a),
                nn.Sequential(net.repeat_3, net.block8),
            ]
        )
        self.neck = nn.Sequential(net.avgpool_1a, net.dropout, nn.Flatten(), net.last_linear, net.last_bn)
        self.num_features = 512
        self.head = nn.Identity()


class DlibBlock(nn.Module):
    """dlib's `ares` / `ares_down`: relu(x' + affine(conv(relu(affine(conv(x)))))), where dlib's affine
    layers are folded into the convolutions' weights and biases (exact up to float rounding).

    dlib pads nothing in a strided convolution or pooling, so in a down block the two branches can
    differ in size (e.g. 3x3 against 4x4); dlib's add_prev then adds them zero-padded at the bottom
    and right, which `_add_padded` reproduces. x' is x, or avg_pool(2x2, stride 2)(x) when down."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        stride, pad = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, pad)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.short = nn.AvgPool2d(2, 2) if down else nn.Identity()

    @staticmethod
    def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape == b.shape:
            return a + b
        c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
        out = a.new_zeros(a.shape[0], c, h, w)
        out[:, : a.shape[1], : a.shape[2], : a.shape[3]] += a
        out[:, : b.shape[1], : b.shape[2], : b.shape[3]] += b
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(self._add_padded(y, self.short(x)))


# (channels, down) of each block, input to output: dlib's alevel4 .. alevel0
DLIB_BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2 \
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)


class DlibResNet(Backbone):
    """dlib_face_recognition_resnet_model_v1's network (dnn_face_recognition_ex.cpp): 150x150 RGB in,
    conv 7x7/2 (32) -> max pool 3x3/2 -> 15 residual blocks -> global average pool (256 features) ->
    fc without bias to 128 (the head; not normalised here, as dlib returns it). Input scaling is
    (pixel - channel mean) / 256, stored as the model file's normalisation."""

    def __init__(self) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 0), nn.ReLU(), nn.MaxPool2d(3, 2))
        blocks, cin = [], 32
        for cout, down in DLIB_BLOCKS:
            blocks.append(DlibBlock(cin, cout, down))
            cin = cout
        # stages by resolution, so freeze_stages and friends mean something
        self.stages = nn.ModuleList([stem, nn.Sequential(*blocks[:3]), nn.Sequential(*blocks[3:7]),
                                     nn.Sequential(*blocks[7:10]), nn.Sequential(*blocks[10:])])
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 256
        self.head = nn.Linear(256, 128, bias=False)
        self.head_kind = "embedding"

    def reset_head(self, kind: str, out_dim: int = 0, dropout: float = 0.0) -> None:
        if kind not in ("embedding", "none") or out_dim not in (0, 128):
            raise ValueError("dlib-resnet keeps dlib's own 128-d head")


def create_backbone(
    name: str = "resnet",
    input_size: int = 112,
    width: int = 32,
    layers: Sequence[int] = (1, 2, 2, 1),
    feature_dim: int = 256,
    dropout: float = 0.0,
    pretrained: str | None = None,
    head: str = "none",
    out_dim: int = 0,
) -> Backbone:
    if name == "seed-cnn":
        net: Backbone = SeedCNN(input_size, feature_dim)
    elif name == "resnet":
        net = CompactResNet(input_size, width, layers, feature_dim, dropout)
    elif name == "inception-resnet-v1":
        net = InceptionResnetBackbone(pretrained)
    elif name == "dlib-resnet":
        return DlibResNet()
    else:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    net.reset_head(head, out_dim, dropout if name != "inception-resnet-v1" else 0.0)
    return net


def backbone_from_config(model_cfg, input_size: int, head: str = "none", out_dim: int = 0) -> Backbone:
    """`model_cfg` is a verify.config.ModelConfig (or its dict)."""
    m = model_cfg if isinstance(model_cfg, dict) else model_cfg.__dict__
    return create_backbone(
        m["backbone"], input_size, m["width"], tuple(m["layers"]), m["feature_dim"], m["dropout"],
        m.get("pretrained"), head, out_dim,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
