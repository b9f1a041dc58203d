"""The Cerberus network: the `cerberus` preset has the published checkpoint's parameter names and
shapes, loads such a checkpoint with one call, and produces every head's output."""

from pathlib import Path

import torch

from inference.network import DECODERS, PATCH_HEAD, TISSUE_CLASSES, build, load_published_checkpoint

PUBLISHED_KEYS = Path(__file__).parent / "data" / "cerberus_state_dict_keys.txt"


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
    loaded = load_published_checkpoint(str(path))
    bias = loaded.output_head["Nuclei#TYPE"]["TYPE"].x[1].conv.bias
    assert torch.all(bias == 0.25)


def test_forward_gives_every_head_at_input_size():
    net = build("cerberus").eval()
    with torch.no_grad():
        out = net(torch.randint(0, 256, (1, 3, 448, 448)).float())
    expected = {
        f"{name.split('#')[0]}-{head}": channels for name, (head, channels) in DECODERS.items()
    }
    assert set(out) == {*expected, PATCH_HEAD}
    for key, channels in expected.items():
        assert out[key].shape == (1, channels, 448, 448), key
    assert out[PATCH_HEAD].shape == (1, len(TISSUE_CLASSES))
