"""Export -> load is bit-exact, really packed, and refuses bad files."""
from __future__ import annotations

import json

import pytest
import torch

from diffq.errors import CheckpointError
from diffq.export import WEIGHTS_NAME, export_quantized, load_quantized, pack_bits, read_metadata, unpack_bits
from diffq.layers import layer_table
from diffq.models import build_tiny_pipeline
from tests.helpers import A8, outputs, quantized_copy

CONFIGS = {
    "int8": ({"format": "int", "bits": 8, "granularity": "channel"}, A8),
    "int4_group": ({"format": "int", "bits": 4, "granularity": "group:16"}, A8),
    "fp8": ({"format": "fp", "bits": 8, "granularity": "channel"}, {"format": "fp", "bits": 8}),
    "nvfp4": ({"format": "nvfp4", "bits": 4, "granularity": "block"}, {"format": "none"}),
}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_load_is_bit_exact(tmp_path, name):
    weight, act = CONFIGS[name]
    _, model, specs, calib = quantized_copy("sd", weight=weight, act=act)
    export_quantized(model, specs, tmp_path)
    loaded = load_quantized(tmp_path)  # rebuilt from the file's own class + config
    assert type(loaded).__name__ == "UNet2DConditionModel"
    for a, b in zip(outputs(model, calib), outputs(loaded, calib)):
        assert torch.equal(a, b)
    into = build_tiny_pipeline("sd", seed=7).unet  # other random weights, same architecture
    load_quantized(tmp_path, into)
    for a, b in zip(outputs(model, calib), outputs(into, calib)):
        assert torch.equal(a, b)


def test_weights_are_really_packed(tmp_path):
    w8, _ = CONFIGS["int8"]
    w4 = {"format": "int", "bits": 4, "granularity": "channel"}
    sizes = {}
    for bits, weight in ((8, w8), (4, w4)):
        _, model, specs, _ = quantized_copy("sd", weight=weight, act={"format": "none"})
        export_quantized(model, specs, tmp_path / str(bits))
        meta = read_metadata(tmp_path / str(bits))
        layers = layer_table(model)
        from safetensors import safe_open

        with safe_open(str(tmp_path / str(bits) / WEIGHTS_NAME), "pt") as f:
            for layer_name in meta["packed"]:
                stored = f.get_tensor(f"{layer_name}.weight.codes")
                n = layers[layer_name].weight.numel()
                if bits == 8:
                    assert stored.dtype == torch.int8 and stored.numel() == n
                else:
                    assert stored.dtype == torch.uint8 and stored.numel() == -(-n // 2)
        sizes[bits] = sum(layout_bytes for layout_bytes in [(tmp_path / str(bits) / WEIGHTS_NAME).stat().st_size])
    assert sizes[4] < sizes[8]


def test_mismatched_missing_and_corrupt_checkpoints(tmp_path):
    _, model, specs, _ = quantized_copy("sd")
    export_quantized(model, specs, tmp_path / "ok")
    other = build_tiny_pipeline("sdxl").unet
    with pytest.raises(CheckpointError, match="differs|holds"):
        load_quantized(tmp_path / "ok", other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WEIGHTS_NAME).write_bytes((tmp_path / "ok" / WEIGHTS_NAME).read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(bad)


def test_metadata_describes_spec_and_formats(tmp_path):
    _, model, specs, _ = quantized_copy("sd")
    path = export_quantized(model, specs, tmp_path)
    meta = read_metadata(path)
    assert meta["class_name"] == "UNet2DConditionModel"
    assert {s["name"] for s in meta["specs"]} == {s.name for s in specs}
    assert all(v["format"] == "int8" for v in meta["packed"].values())
    json.dumps(meta)


SIZE_CONFIGS = {
    **{k: v[0] for k, v in CONFIGS.items()},
    "mxfp4": {"format": "mxfp4", "bits": 4, "granularity": "block"},
    "ternary": {"format": "ternary", "bits": 2, "granularity": "channel", "observer": "absmean"},
    "binary2": {"format": "binary", "bits": 2, "granularity": "channel"},
    "binary1": {"format": "binary", "bits": 1, "granularity": "channel"},  # 8 signs a byte
    "uint4": {"format": "int", "bits": 4, "granularity": "channel", "symmetric": False},
}


@pytest.mark.parametrize("name", list(SIZE_CONFIGS))
def test_reported_bits_are_the_bits_the_file_holds(tmp_path, name):
    from safetensors import safe_open

    from diffq.eval.cost import quantizer_bits

    _, model, specs, calib = quantized_copy("sd", weight=SIZE_CONFIGS[name], act={"format": "none"})
    path = export_quantized(model, specs, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        sizes = {k: f.get_tensor(k).nbytes for k in f.keys()}
    for layer_name, layer in layer_table(model).items():
        numel = layer.weight.numel()
        held = sum(n for k, n in sizes.items() if k.startswith(f"{layer_name}.weight.")) * 8 / numel
        assert held == pytest.approx(quantizer_bits(layer.weight_quantizer), rel=0.01, abs=8 / numel), layer_name
        assert not any(k.startswith(f"{layer_name}.weight_quantizer.") for k in sizes)  # not stored twice
    loaded = load_quantized(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, calib), outputs(loaded, calib)))


def test_previous_versions_are_refused_with_the_fix(tmp_path):
    _, model, specs, _ = quantized_copy("sd")
    path = export_quantized(model, specs, tmp_path)
    meta = read_metadata(path)
    meta["version"] = 1
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"diffq": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"diffq.quantized v1 file; expected diffq.quantized v2: re-export"):
        load_quantized(tmp_path)
