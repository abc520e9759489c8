"""scripts/compare_peers.py: the coverage counter on hand-made models, and the diffq column without peers."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffq.errors import ConfigError
from diffq.layers import quantize_layer_
from diffq.models import load_pipeline
from diffq.roles import quantizable_layers
from diffq.tensor_quant import TensorQuant

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_peers.py"
_spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
cp = sys.modules.setdefault("compare_peers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(cp)


class FakeQuantizer(nn.Module):
    """A ModelOpt-style TensorQuantizer stand-in: identity, with ``is_enabled``."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.is_enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PeerLinear(nn.Linear):
    """A ModelOpt-style quantized Linear: input, weight and output quantizers called in forward."""

    def __init__(self, n: int, weight: bool, inp: bool, out: bool) -> None:
        super().__init__(n, n)
        self.weight_quantizer, self.input_quantizer = FakeQuantizer(weight), FakeQuantizer(inp)
        self.output_quantizer = FakeQuantizer(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias))


class HandMade(nn.Module):
    """Known coverage: weights 3 of 5 ran layers (diffq linear, peer linear, peer conv), inputs 1 linear (diffq)
    + 1 linear (peer) + 0 conv, outputs 1 linear; ``unused`` (all quantizers on) never runs."""

    def __init__(self) -> None:
        super().__init__()
        w = TensorQuant(bits=8, granularity="channel").build_quantizer("weight")
        a = TensorQuant(bits=8, granularity="token", symmetric=False).build_quantizer("act")
        self.dq = quantize_layer_(nn.Linear(8, 8), w, a)  # diffq: weight + input
        w.calibrate_weight(self.dq.weight)
        self.dq_w = quantize_layer_(nn.Linear(8, 8), None, None)  # converted, nothing quantized
        self.peer = PeerLinear(8, weight=True, inp=True, out=True)
        self.conv = nn.Conv2d(8, 8, 1)
        self.conv.weight_quantizer, self.conv.input_quantizer = FakeQuantizer(True), FakeQuantizer(False)
        self.plain = nn.Linear(8, 8)
        self.unused = PeerLinear(8, weight=True, inp=True, out=True)

    def forward(self, x: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        h = self.plain(self.peer(self.dq_w(self.dq(x))))
        return (self.conv(self.conv.input_quantizer(h)[..., None, None]).flatten(1),)


def test_coverage_counts_a_hand_made_model():
    cov = cp.count_coverage(HandMade(), {"x": torch.randn(2, 8)})
    assert (cov.layers, cov.weights) == (5, 3)
    assert cov.inputs == {"linear": 2} and cov.outputs == {"linear": 1}
    assert cov.describe() == "weights 3/5 linear+conv, inputs 2 linear, outputs 1 linear"


def test_coverage_of_quanto_on_a_toy_model():
    qt = pytest.importorskip("optimum.quanto")
    model = cp._Probe()
    qt.quantize(model, weights=qt.qint8, activations=qt.qint8)
    with torch.no_grad(), qt.Calibration():
        model(torch.randn(2, 4, 8, 8))
    qt.freeze(model)
    cov = cp.count_coverage(model, {"sample": torch.randn(2, 4, 8, 8)})
    assert (cov.layers, cov.weights) == (2, 2)
    assert cov.inputs == {"linear": 1}  # quanto never quantizes a convolution's input


def test_unknown_preset_stops_before_loading():
    with pytest.raises(ConfigError, match="unknown preset"):
        cp.compare(["model=tiny_sd15"], ["w8a8", "w9a9"])


TINY = ["model=tiny_sd15", "calib.num_prompts=1", "calib.num_steps=2", "model.steps=3"]


def test_diffq_column_without_peers(monkeypatch, capsys, tmp_path):
    for module in cp.PEERS.values():  # the peers are installed here: make their import fail
        monkeypatch.setitem(sys.modules, module, None)
    rows, skipped = cp.compare(TINY, ["w8a8", "w8a8_linear"], held_out=1, images=2, repeats=1, rounds=1)
    out = capsys.readouterr().out
    assert set(skipped) == set(cp.PEERS)
    for package in cp.PEERS:
        assert f"skipped {package}: not importable (ModuleNotFoundError" in out
    assert [r["tool"] for r in rows] == ["fp", "diffq", "diffq"]
    by_config = {r["config"]: r for r in rows[1:]}
    for r in by_config.values():
        assert all(math.isfinite(v) for v in [r["sqnr_eps_db"], r["sqnr_x0_db"], r["psnr_db"],
                                              *r["sqnr_eps_steps"], *r["sqnr_x0_steps"]])
        assert len(r["sqnr_eps_steps"]) == 3 and r["quant_s"] > 0 and r["step_ratio"] > 0
    unet = load_pipeline(cp.compose_cfg(TINY).model, device="cpu").unet
    kinds = [(role, type(m)) for role, m in quantizable_layers(unet, "sd").values()]
    kept = [t for role, t in kinds if role not in ("conv_in", "conv_out", "time_embed")]
    linear, conv = kept.count(nn.Linear), kept.count(nn.Conv2d)
    full, lin_only = by_config["w8a8"], by_config["w8a8_linear"]
    assert full["weights"] == lin_only["weights"] == f"{linear + conv}/{len(kinds)}"
    assert (full["inputs_linear"], full["inputs_conv"]) == (linear, conv)
    assert (lin_only["inputs_linear"], lin_only["inputs_conv"], lin_only["outputs_linear"]) == (linear, 0, 0)
    assert lin_only["sqnr_eps_db"] > full["sqnr_eps_db"]  # convolution inputs are where W8A8 loses most here
    cp.write_csv(rows, tmp_path / "peers.csv")
    table = list(csv.DictReader((tmp_path / "peers.csv").open()))
    assert [r["config"] for r in table] == ["-", "w8a8", "w8a8_linear"] and table[2]["inputs_conv"] == "0"
    assert "| diffq | w8a8_linear | weights" in cp.format_table(rows)
