"""The Cerberus multi-task network (Graham et al., Medical Image Analysis 2023).

A ResNet encoder shared by separate U-Net-style decoders with additive skips, one per task
(`Gland`, `Gland#TYPE`, `Lumen`, `Nuclei`, `Nuclei#TYPE`), each ending in a 1x1 output head, and
a patch-classification head on the centre of the bottleneck. Module names follow the published
implementation so that its checkpoint loads into the `cerberus` preset unchanged
(see docs/cerberus_layout.md); smaller presets reuse the same structure with other widths.

Two options of a preset go beyond the published design. `gland_scale` runs the region tasks
(glands, lumina, gland type, tissue class) on the input downsampled by that factor, through the
same encoder: at 1 µm/px the network sees twice the tissue per pixel of receptive field, enough
for the largest malignant glands. `fine_stage` adds a last decoder stage at the input's own
resolution to the nuclear decoders (a strided stem otherwise ends them at half of it), fed by a
shallow full-resolution convolution of the input as its skip. `nucleus_scale` runs the nuclear
tasks on the input downsampled by that factor too (2: a 0.25 µm/px input that the encoder reads
at 0.5 µm/px, as it was trained), their decoders gaining one more stage, back at the input's own
resolution, with a shallow convolution of the input as its skip: nuclear outlines at 0.25 µm/px
(40x), where CoNSeP and MoNuSeg were drawn. `nucleus_hv` gives the nuclear decoder a second
output, HoVer-Net's horizontal and vertical distance maps (Graham et al., Medical Image Analysis
2019: each nucleus pixel's offset from its nucleus's centre, scaled to [-1, 1] within the
nucleus), whose steep changes separate touching nuclei.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

#: Segmentation decoders: name -> output head name. INST heads have 3 channels (background /
#: eroded inner / contour), TYPE heads one per class of the preset (index 0 = no label).
DECODERS = {
    "Gland": "INST",
    "Gland#TYPE": "TYPE",
    "Lumen": "INST",
    "Nuclei": "INST",
    "Nuclei#TYPE": "TYPE",
}
#: Decoders of the region tasks (run at `Preset.gland_scale`); the others are nuclear.
REGION_DECODERS = ("Gland", "Gland#TYPE", "Lumen")
PATCH_HEAD = "Patch-Class"
#: Asked for as a task, the encoder's last feature map is returned too (for compression).
BOTTLENECK = "Bottleneck"
#: The nuclear decoder's distance-map output (regression, no softmax) of `Preset.nucleus_hv`.
NUCLEI_HV = "Nuclei-HV"

NUCLEUS_TYPES = (
    "nolabel",
    "neutrophil",
    "epithelial",
    "lymphocyte",
    "plasma",
    "eosinophil",
    "connective",
)
GLAND_TYPES = ("nolabel", "gland", "surface-epi")
#: The classes this project's manual labels teach: CoNSeP's four nuclear classes (Graham et al.
#: 2019, merged as in HoVer-Net) and GlaS's grade given to each gland of an image.
LABELLED_NUCLEUS_TYPES = ("nolabel", "other", "inflammatory", "epithelial", "connective")
LABELLED_GLAND_TYPES = ("nolabel", "benign gland", "malignant gland")
TISSUE_CLASSES = (
    "background",
    "abnormal epithelium",
    "normal epithelium",
    "inflammatory",
    "muscle",
    "stroma",
    "debris",
    "mucous",
    "adipose",
)


@dataclass(frozen=True)
class Preset:
    """Shapes of one network configuration."""

    name: str
    widths: tuple[int, int, int, int, int]  # stem, then the four encoder stages
    blocks: tuple[int, int, int, int]  # residual blocks per stage
    stem_stride: int  # 1 in Cerberus: full-resolution decoder output
    input_size: int  # patch side read from the slide, px at `mpp`
    output_size: int  # central part of the output that is kept, px
    head_channels: int = 96
    imagenet_fc: bool = False  # the published checkpoint carries an unused 1000-class fc
    mpp: float = 0.5
    gland_scale: int = 1  # region tasks run on the input downsampled by this factor
    fine_stage: bool = False  # nuclear decoders end at the input's resolution
    nucleus_scale: int = 1  # nuclear tasks encode the input downsampled by this factor (1 or 2)
    nucleus_hv: bool = False  # the nuclear decoder also predicts HoVer-Net distance maps
    nucleus_types: tuple[str, ...] = NUCLEUS_TYPES
    gland_types: tuple[str, ...] = GLAND_TYPES

    @property
    def total_stride(self) -> int:
        return self.stem_stride * 16  # maxpool and three strided stages

    @property
    def patch_cells(self) -> int:
        """Bottleneck cells of the region branch under the kept output (Cerberus: 144 / 16 = 9)."""
        return self.output_size // (self.total_stride * self.gland_scale)

    def channels(self, decoder: str) -> int:
        """Output channels of a decoder's head."""
        if decoder == "Nuclei#TYPE":
            return len(self.nucleus_types)
        if decoder == "Gland#TYPE":
            return len(self.gland_types)
        return 3


_CPU = Preset(
    name="cpu",
    widths=(32, 32, 64, 128, 256),
    blocks=(2, 2, 2, 2),
    stem_stride=2,
    input_size=512,
    output_size=384,
    head_channels=32,
)
PRESETS = {
    "cerberus": Preset(
        name="cerberus",
        widths=(64, 64, 128, 256, 512),
        blocks=(3, 4, 6, 3),
        stem_stride=1,
        input_size=448,
        output_size=144,
        imagenet_fc=True,
    ),
    # Our CPU design: half the widths, two blocks per stage, a stride-2 stem (decoders end at
    # 1 µm/px; logits are upsampled to the input), and a thin 64 px context margin so that most
    # of each patch is kept: 512 in, 384 kept.
    "cpu": _CPU,
    # The cpu encoder and decoders, with the region tasks at 1 µm/px (a 1024 px tile at 0.5 µm/px
    # is 512 µm of tissue for them, 384 µm of it kept), a full-resolution last stage for nuclei,
    # and heads for the classes the project's manual labels teach.
    "cpu-multiscale": replace(
        _CPU,
        name="cpu-multiscale",
        input_size=1024,
        output_size=768,
        gland_scale=2,
        fine_stage=True,
        nucleus_types=LABELLED_NUCLEUS_TYPES,
        gland_types=LABELLED_GLAND_TYPES,
    ),
}
# The same network read at 0.25 µm/px (40x): the encoder sees the input at 0.5 µm/px for nuclei
# and 1 µm/px for regions as in cpu-multiscale, and the nuclear decoders add a stage at 0.25 µm/px.
PRESETS["cpu-multiscale-40x"] = replace(
    PRESETS["cpu-multiscale"],
    name="cpu-multiscale-40x",
    mpp=0.25,
    input_size=2048,
    output_size=1536,
    gland_scale=4,
    nucleus_scale=2,
)
# The same with HoVer-Net distance maps beside the nuclear inner/contour classes.
PRESETS["cpu-multiscale-hv"] = replace(
    PRESETS["cpu-multiscale"], name="cpu-multiscale-hv", nucleus_hv=True
)

#: Channels of the fine stage's full-resolution skip and of its output.
FINE_CHANNELS = 16


class Encoder(nn.Module):
    """A torchvision-style ResNet (same parameter names) returning the five feature maps."""

    def __init__(self, preset: Preset):
        super().__init__()
        stem, *stages = preset.widths
        self.conv1 = nn.Conv2d(3, stem, 7, stride=preset.stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem
        for i, (width, count) in enumerate(zip(stages, preset.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            layer = [BasicBlock(channels, width, stride, downsample)]
            layer += [BasicBlock(width, width) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            channels = width
        if preset.imagenet_fc:
            self.fc = nn.Linear(channels, 1000)  # unused; present for checkpoint compatibility

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x0, x1, x2, x3, x4]


class ConvLayer(nn.Module):
    """conv -> batch norm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, ksize: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, ksize, padding=ksize // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_chs: list[int], ksize: int):
        super().__init__()
        self.block = nn.ModuleList()
        for out_ch in out_chs:
            self.block.append(ConvLayer(in_ch, out_ch, ksize))
            in_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class Conv1x1(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class OutputHead(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.x = nn.Sequential(ConvBlock(in_ch, [mid_ch], 1), Conv1x1(mid_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.x(x)


def _decoder(f: tuple[int, ...], fine: int) -> nn.ModuleList:
    """Four upsampling stages from the bottleneck back to the stem's resolution, and `fine` more
    at twice the resolution each (the first at the encoder's input)."""
    stages = [
        ConvBlock(f[-2], [f[-2], f[-3]], 3),
        ConvBlock(f[-3], [f[-3], f[-4]], 3),
        ConvBlock(f[-4], [f[-4], f[-5]], 3),
        ConvBlock(f[-5], [f[-5], f[-5]], 3),
    ]
    if fine:
        stages.append(ConvBlock(f[-5], [FINE_CHANNELS], 3))
    for _ in range(fine - 1):
        stages.append(_identity_start(ConvBlock(FINE_CHANNELS, [FINE_CHANNELS], 3)))
    return nn.ModuleList(stages)


def _identity_start(block: ConvBlock) -> ConvBlock:
    """A stage added after a trained one starts by passing its upsampled features on unchanged
    (a Dirac kernel; the features are ReLU outputs, so the block's ReLU keeps them)."""
    for layer in block.block:
        nn.init.dirac_(layer.conv.weight)
        nn.init.zeros_(layer.conv.bias)
    return block


class CerberusNet(nn.Module):
    """Input: RGB uint8-range tensors (N, 3, H, W) at `preset.mpp`. Output: logits per head,
    `<task>-INST` / `<task>-TYPE` at the input size and `Patch-Class` as (N, 9)."""

    def __init__(self, preset: Preset):
        super().__init__()
        self.preset = preset
        f = preset.widths
        self.backbone = Encoder(preset)
        self.conv_map = nn.Conv2d(f[-1], f[-2], 1, bias=False)
        if preset.nucleus_scale not in (1, 2) or (preset.nucleus_scale > 1 > preset.fine_stage):
            raise ValueError("nucleus_scale 2 needs fine_stage; only 1 and 2 are built")
        fine = preset.fine_stage * preset.nucleus_scale  # stages past the stem: 0, 1 or 2

        def has_fine_stage(name: str) -> bool:
            return fine > 0 and name not in REGION_DECODERS

        heads: dict[str, nn.Module] = {
            name: _decoder(f, fine if has_fine_stage(name) else 0) for name in DECODERS
        }
        heads[PATCH_HEAD] = nn.Sequential(
            OrderedDict(
                bn1=nn.BatchNorm2d(f[-1], eps=1e-5),
                relu1=nn.ReLU(inplace=True),
                dropout=nn.Dropout(p=0.3),
                conv1=nn.Conv2d(f[-1], f[-2], 1),
                bn2=nn.BatchNorm2d(f[-2], eps=1e-5),
                relu2=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(f[-2], len(TISSUE_CLASSES), 1),
            )
        )
        self.decoder_head = nn.ModuleDict(heads)

        def output(name: str, channels: int) -> OutputHead:
            width = FINE_CHANNELS if has_fine_stage(name) else f[0]
            return OutputHead(width, preset.head_channels, channels)

        self.output_head = nn.ModuleDict(
            {
                name: nn.ModuleDict({head: output(name, preset.channels(name))})
                for name, head in DECODERS.items()
            }
        )
        if preset.nucleus_hv:
            self.output_head["Nuclei"]["HV"] = output("Nuclei", 2)
        if fine:
            self.fine_skip = ConvLayer(3, f[0], 3)
        if fine > 1:  # starts at zero: the new stage first sees only the features below it
            self.finer_skip = ConvLayer(3, FINE_CHANNELS, 3)
            nn.init.zeros_(self.finer_skip.conv.weight)
            nn.init.zeros_(self.finer_skip.conv.bias)

    def forward(self, images: torch.Tensor, tasks: tuple[str, ...] | None = None) -> dict:
        """Every requested head for images at `preset.mpp`; region tasks go through the
        downsampled branch when the preset has one, nuclear ones through theirs, their logits at
        input size."""
        scale = self.preset.gland_scale
        wanted = set(DECODERS) | {PATCH_HEAD} if tasks is None else set(tasks)
        region = wanted & {*REGION_DECODERS, PATCH_HEAD}
        if scale == 1 or not region:
            return self.decode(images, tasks, self.preset.nucleus_scale)
        out = (
            self.decode(images, tuple(wanted - region), self.preset.nucleus_scale)
            if wanted - region
            else {}
        )
        coarse = self.decode(F.avg_pool2d(images, scale), tuple(region))
        for name, logits in coarse.items():
            if logits.ndim == 4:
                logits = F.interpolate(
                    logits, size=images.shape[-2:], mode="bilinear", align_corners=False
                )
            out[name] = logits
        return out

    def output_names(self, tasks: tuple[str, ...]) -> list[str]:
        """The keys of `forward(images, tasks)`'s result, sorted."""
        names = [
            f"{name.split('#')[0]}-{head}"
            for name in DECODERS
            if name in tasks
            for head in self.output_head[name]
        ]
        names += [name for name in (PATCH_HEAD, BOTTLENECK) if name in tasks]
        return sorted(names)

    def decode(
        self, images: torch.Tensor, tasks: tuple[str, ...] | None = None, pool: int = 1
    ) -> dict:
        """The requested heads from one pass of the encoder over `images` pooled `pool` times
        (training feeds the region tasks images already at their resolution, the nuclear ones
        at the input's with `pool` = `preset.nucleus_scale`); logits at the images' size."""
        size = images.shape[-2:]
        encoded = (F.avg_pool2d(images, pool) if pool > 1 else images) / 255.0
        feats = self.backbone(encoded)
        bottom = self.conv_map(feats[-1])
        skips = feats[-2::-1]  # the four encoder maps a decoder adds, coarsest first
        # Past the encoder's maps, made once: of the encoder's input, then of the images (pool 2).
        fine_skips: list[torch.Tensor] = []
        out = {}
        for name, blocks in self.decoder_head.items():
            if name == PATCH_HEAD or (tasks is not None and name not in tasks):
                continue
            x = bottom
            for i, block in enumerate(blocks):
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                if i < len(skips):
                    x = block(skips[i] + x)
                    continue
                j = i - len(skips)
                if j == len(fine_skips):
                    skip = self.fine_skip(encoded) if j == 0 else self.finer_skip(images / 255.0)
                    fine_skips.append(skip)
                x = block(fine_skips[j] + x)
            for head, module in self.output_head[name].items():
                logits = module(x)
                if logits.shape[-2:] != size:  # strided stems decode below input resolution
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                out[f"{name.split('#')[0]}-{head}"] = logits
        if tasks is not None and BOTTLENECK in tasks:
            out[BOTTLENECK] = feats[-1]
        if tasks is None or PATCH_HEAD in tasks:
            centre = _crop_centre(feats[-1], self.preset.patch_cells)
            pooled = F.adaptive_avg_pool2d(centre, 1)
            out[PATCH_HEAD] = self.decoder_head[PATCH_HEAD](pooled).flatten(1)
        return out


def _crop_centre(x: torch.Tensor, cells: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h <= cells and w <= cells:
        return x
    top, left = (h - cells) // 2, (w - cells) // 2
    return x[..., top : top + cells, left : left + cells]


def build(preset: str | Preset) -> CerberusNet:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return CerberusNet(preset)
