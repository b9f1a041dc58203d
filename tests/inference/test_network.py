"""The Cerberus network: the `cerberus` preset has the published checkpoint's parameter names and
shapes, loads such a checkpoint with one call, and produces every head's output."""

from pathlib import Path

import pytest
import torch

from inference import weights
from inference.network import (
    DECODERS,
    NUCLEI_HV,
    PATCH_HEAD,
    PRESETS,
    TISSUE_CLASSES,
    build,
)

PUBLISHED_KEYS = Path(__file__).parents[1] / "data" / "cerberus_state_dict_keys.txt"


def published_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in PUBLISHED_KEYS.read_text().splitlines():
        key, shape = line.split("\t")
        layout[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return layout


def test_cerberus_preset_matches_the_published_parameter_layout():
    state = build("cerberus").state_dict()
    expected = published_layout()
    assert len(expected) == 558
    assert set(state) == set(expected)
    mismatched = {
        k: (tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]
    }
    assert mismatched == {}


def test_a_checkpoint_in_the_published_format_loads_with_one_call(tmp_path):
    source = build("cerberus")
    with torch.no_grad():
        source.output_head["Nuclei#TYPE"]["TYPE"].x[1].conv.bias.fill_(0.25)
    path = tmp_path / "weights.tar"
    desc = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved under DataParallel
    torch.save({"desc": desc, "optimizer": {}}, path)
    loaded, info = weights.load(path)  # the same flag as our own weights: --weights weights.tar
    assert info.preset.name == "cerberus"
    bias = loaded.output_head["Nuclei#TYPE"]["TYPE"].x[1].conv.bias
    assert torch.all(bias == 0.25)


@pytest.mark.parametrize("preset", ["cerberus", "cpu", "cpu-multiscale", "cpu-multiscale-hv"])
def test_forward_gives_every_head_at_input_size(preset):
    size = PRESETS[preset].input_size
    net = build(preset).eval()
    with torch.no_grad():
        out = net(torch.randint(0, 256, (1, 3, size, size)).float())
    expected = {
        f"{name.split('#')[0]}-{head}": PRESETS[preset].channels(name)
        for name, head in DECODERS.items()
    }
    if PRESETS[preset].nucleus_hv:
        expected[NUCLEI_HV] = 2
    assert set(out) == {*expected, PATCH_HEAD}
    for key, channels in expected.items():
        assert out[key].shape == (1, channels, size, size), key
    assert out[PATCH_HEAD].shape == (1, len(TISSUE_CLASSES))


def test_cpu_preset_is_smaller_with_a_strided_stem_and_a_larger_kept_output():
    cpu, cerberus = PRESETS["cpu"], PRESETS["cerberus"]
    assert cpu.stem_stride == 2 and cerberus.stem_stride == 1
    kept = cpu.output_size**2 / cpu.input_size**2
    assert kept > 4 * cerberus.output_size**2 / cerberus.input_size**2
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(build("cpu")) * 5 < count(build("cerberus"))


def test_multiscale_region_heads_see_the_input_at_half_resolution():
    """The region tasks of `cpu-multiscale` are the network's `decode` of the 2x-pooled input,
    brought back to input size; the nuclear ones decode the input itself, to its full size."""
    net = build("cpu-multiscale").eval()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 256, 256)).float()
    with torch.no_grad():
        out = net(images, tasks=("Gland", "Nuclei"))
        coarse = net.decode(torch.nn.functional.avg_pool2d(images, 2), tasks=("Gland",))
        fine = net.decode(images, tasks=("Nuclei",))
    assert coarse["Gland-INST"].shape[-1] == 128
    upsampled = torch.nn.functional.interpolate(
        coarse["Gland-INST"], size=(256, 256), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out["Gland-INST"], upsampled)
    torch.testing.assert_close(out["Nuclei-INST"], fine["Nuclei-INST"])
    assert net.decoder_head["Nuclei"][-1] is not None and len(net.decoder_head["Nuclei"]) == 5
    assert len(net.decoder_head["Gland"]) == 4  # no full-resolution stage for regions


def test_40x_nuclei_end_at_the_input_from_an_encoder_at_half_of_it():
    """`cpu-multiscale-40x` reads 0.25 µm/px: nuclei are decoded from the input pooled 2x (the
    encoder's 0.5 µm/px) up to the input itself, regions from the input pooled 4x; the nuclear
    decoders' stage at the input's resolution starts by passing its features on unchanged."""
    net = build("cpu-multiscale-40x").eval()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 256, 256)).float()
    with torch.no_grad():
        out = net(images, tasks=("Gland", "Nuclei"))
        nuclear = net.decode(images, tasks=("Nuclei",), pool=2)
        coarse = net.decode(torch.nn.functional.avg_pool2d(images, 4), tasks=("Gland",))
        features = torch.rand(1, 16, 32, 32)
        passed = net.decoder_head["Nuclei"][-1](features)
        skip = net.finer_skip(images / 255)
    assert out["Nuclei-INST"].shape[-1] == 256 and coarse["Gland-INST"].shape[-1] == 64
    torch.testing.assert_close(out["Nuclei-INST"], nuclear["Nuclei-INST"])
    assert len(net.decoder_head["Nuclei"]) == 6 and len(net.decoder_head["Gland"]) == 4
    torch.testing.assert_close(passed, features)
    assert torch.all(skip == 0)
    own = build("cpu-multiscale").state_dict()
    new = {k for k in net.state_dict() if k not in own}
    assert new and all(k.startswith(("decoder_head.Nuclei", "finer_skip")) for k in new)
