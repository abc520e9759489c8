"""One home for the quantize stage: presets compose without Hydra exactly as the app composes them,
settings sections registered beside their code make the schema, a metric is one registration, and
save/load come in pairs (old names kept as warning aliases)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import diffq
from diffq.config import EvalConfig, QuantConfig
from diffq.errors import ConfigError
from diffq.eval import suite
from diffq.methods import SETTINGS as METHOD_SETTINGS
from diffq.methods.fp_search import SearchConfig
from diffq.methods.mixdq import MixDQConfig
from diffq.preset_config import compose_stage
from diffq.registry import Registry
from diffq.settings import typed, with_sections

STAGE = ("quant", "recon", "finetune", "calib")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(diffq.presets()))
def test_presets_compose_without_hydra_as_the_app_does(preset):
    hydra = diffq.compose_config(preset, {"quant.weight.bits": 3} if preset == "w4a8" else None)
    plain = compose_stage(preset, {"quant.weight.bits": 3} if preset == "w4a8" else None)
    for group in STAGE:
        assert OmegaConf.to_container(plain[group], resolve=True) == OmegaConf.to_container(hydra[group], resolve=True)


def test_quantize_runs_without_hydra():
    code = ("import copy, sys, diffq\nfrom diffq.preset_config import compose_stage\n"
            "from diffq.models import denoiser_of\nfrom tests.helpers import pipeline_and_calib\n"
            "cfg = compose_stage('quest_w4a8', {'finetune.steps': 7})\n"
            "assert cfg.finetune.name == 'quest' and cfg.finetune.steps == 7 and cfg.recon.name == 'quick'\n"
            "pipe, calib = pipeline_and_calib('sd')\nm = copy.deepcopy(denoiser_of(pipe)[1])\n"
            "diffq.quantize(m, 'w4a8', calib=[s.kwargs for s in calib])\n"
            "assert m.diffq_report.cost['effective_weight_bits'] < 5\n"
            "assert not any(m == 'hydra' or m.startswith('hydra.') for m in sys.modules), 'hydra was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_bad_override_or_preset_is_one_config_error():
    with pytest.raises(ConfigError, match="unknown preset 'w9a9'"):
        compose_stage("w9a9")
    with pytest.raises(ConfigError, match=r"override quant\.weight\.bitz=4"):
        compose_stage("w8a8", {"quant.weight.bitz": 4})


def test_the_schema_is_assembled_from_the_registered_sections():
    names = {f.name for f in fields(QuantConfig)}
    assert {"search", "mixdq", "binarydm"} <= names and set(METHOD_SETTINGS.names()) <= names
    assert QuantConfig(name="x").mixdq == MixDQConfig()
    sections = Registry("test section")

    @sections.register("extra")
    @dataclass
    class ExtraSettings:
        knob: int = 3

    @dataclass
    class Base:
        name: str = "b"

    assembled = with_sections("Assembled", Base, sections)
    assert OmegaConf.to_container(OmegaConf.structured(assembled)) == {"name": "b", "extra": {"knob": 3}}


def test_methods_read_typed_settings_with_the_defaults_filled_in():
    assert typed(SearchConfig, {"alphas": 8}, "quant.search") == SearchConfig(alphas=8)
    with pytest.raises(ConfigError, match=r"quant\.search: unknown setting\(s\) \['alfas'\]"):
        typed(SearchConfig, {"alfas": 8}, "quant.search")


def test_a_metric_is_one_registration():
    @suite.METRICS.register("mean_gap")
    def mean_gap(x: suite.MetricInputs) -> dict:
        return {"quant": float((x.fp - x.quant).abs().mean()), "settings": {"pairs": len(x.fp)}}

    ev = OmegaConf.structured(EvalConfig(metrics=["mean_gap", "psnr"], seed=0))
    suite.check_eval(ev)
    fp = torch.full((2, 3, 8, 8), 0.5)
    block = suite.evaluate(ev, fp, fp + 0.25, ["a", "b"], None, "unused")
    assert block["mean_gap"]["quant"] == pytest.approx(0.25) and block["psnr"]["quant"] > 0
    with pytest.raises(ConfigError, match="choose from .*mean_gap"):
        suite.check_eval(OmegaConf.structured(EvalConfig(metrics=["nope"], seed=0)))


def test_save_and_load_are_pairs_and_the_old_names_warn():
    assert diffq.load_pipeline.__module__ == diffq.save_pipeline.__module__ == "diffq.saving"
    assert diffq.load_denoiser.__module__ == diffq.save_denoiser.__module__ == "diffq.export"
    with pytest.warns(DeprecationWarning, match="save_denoiser"):
        with pytest.raises(Exception):  # noqa: B017 - only the warning matters here
            diffq.export_quantized(None, [], "nowhere")
    with pytest.warns(DeprecationWarning, match="save_pipeline"):
        with pytest.raises(Exception):  # noqa: B017
            diffq.save_quantized(None, "nowhere")
