"""Quantization presets by name, without Hydra.

A preset is ``conf/quant/<name>.yaml``. Its defaults list may name a base preset of the same group
(merged first) and pick other groups' options (``override /recon@_global_.recon: quick``); the groups
the quantize stage reads (``quant``, ``recon``, ``finetune``, ``calib``) are composed on their typed
schemas exactly as ``python -m diffq quant=<name>`` composes them (a test compares the two).
"""
from __future__ import annotations

import importlib.resources
from functools import lru_cache
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffq.config import SCHEMAS, PathsConfig
from diffq.errors import ConfigError

STAGE_GROUPS = ("recon", "finetune", "calib", "quant")  # the stage's groups, in the app's defaults order
_SELF = "_self_"


def register_resolvers() -> None:
    """The resolvers the schemas' defaults use: ``${add:1234,${seed}}`` (a seed offset)."""
    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_new_resolver("add", lambda *xs: sum(xs))


def _conf() -> Any:
    return importlib.resources.files("diffq.conf")


def presets() -> dict[str, str]:
    """``{name: one line}`` of the quantization presets (``conf/quant/*.yaml``).

    >>> "w4a8" in diffq.presets()
    True
    """
    out = {}
    for f in sorted((_conf() / "quant").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            text = " ".join(line.lstrip("# ").strip() for line in f.read_text().splitlines() if line.startswith("#"))
            out[f.name.removesuffix(".yaml")] = text.split(". ")[0].rstrip(".")
    return out


@lru_cache(maxsize=None)
def _read(group: str, option: str) -> tuple[dict[str, Any], tuple[str, ...], dict[str, str]]:
    """(body, same-group bases, other groups' picks) of ``conf/<group>/<option>.yaml``."""
    path = _conf() / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"no {group} option {option!r} (conf/{group}/{option}.yaml)")
    body = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False) or {}
    bases, picks = [], {}
    for entry in body.pop("defaults", []):
        if isinstance(entry, str):
            if entry != _SELF:
                bases.append(entry)
            continue
        (key, value), = entry.items()
        target = key.removeprefix("override").strip().lstrip("/").split("@")[0]
        picks[target] = str(value)
    return body, tuple(bases), picks


def _option(group: str, option: str) -> tuple[DictConfig, dict[str, str]]:
    """An option's merged body (its bases first) and the other groups' options it picks."""
    body, bases, picks = _read(group, option)
    merged, chosen = OmegaConf.create({}), {}
    for base in bases:
        node, base_picks = _option(group, base)
        merged = OmegaConf.merge(merged, node)
        chosen.update(base_picks)
    return OmegaConf.merge(merged, body), {**chosen, **picks}


def _app_defaults() -> dict[str, str]:
    """The app's default option of each stage group (``conf/config.yaml``)."""
    entries = OmegaConf.to_container(OmegaConf.create((_conf() / "config.yaml").read_text()))["defaults"]
    return {k: str(v) for e in entries if isinstance(e, dict) for k, v in e.items() if k in STAGE_GROUPS}


def check_preset(preset: Any) -> None:
    """ConfigError for a preset name that is not one of ``conf/quant/``."""
    names = presets()
    if isinstance(preset, str) and preset not in names:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(names)}")


def custom_quant(preset: Mapping[str, Any] | Any) -> DictConfig:
    """A quant mapping or QuantConfig merged onto the schema (name ``custom``); ConfigError for a bad key."""
    custom = OmegaConf.structured(preset) if not isinstance(preset, Mapping) else preset
    try:
        return OmegaConf.merge(OmegaConf.structured(SCHEMAS["quant"](name="custom")), custom)
    except OmegaConfBaseException as e:
        raise ConfigError(f"quantization config: {str(e).splitlines()[0]}") from None


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any] | None) -> DictConfig:
    """``cfg`` with dotted ``overrides`` (``{"quant.weight.bits": 4}``); ConfigError naming a bad one."""
    for key, value in (overrides or {}).items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}={value!r}: {str(e).splitlines()[0]}") from None
    return cfg


def compose_stage(preset: str | Mapping[str, Any] | Any = "w8a8", overrides: Mapping[str, Any] | None = None,
                  seed: int = 0) -> DictConfig:
    """The quantize stage's config (``seed``, ``paths``, ``quant``, ``recon``, ``finetune``, ``calib``)
    of a preset name (or a quant mapping / QuantConfig), with dotted ``overrides``
    (``{"quant.weight.bits": 4}``); ConfigError for an unknown preset or a bad key or value."""
    register_resolvers()
    check_preset(preset)
    options = _app_defaults()
    quant, picks = _option("quant", preset if isinstance(preset, str) else "w8a8")
    options.update(picks)
    cfg = OmegaConf.create({"seed": seed, "paths": OmegaConf.structured(PathsConfig)})
    for group in STAGE_GROUPS:
        body = quant if group == "quant" else _option(group, options[group])[0]
        cfg[group] = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), body)
    if not isinstance(preset, str):
        cfg.quant = custom_quant(preset)
    OmegaConf.set_struct(cfg, True)  # an override of a key the schema lacks is an error, as on the command line
    return apply_overrides(cfg, overrides)
