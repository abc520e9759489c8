"""The bit-config grammar: default formats plus ordered rules, resolved per layer.

A rule matches a layer when its ``roles`` (if any) contain the layer's role AND one of its
``names`` (if any) matches the layer name (shell glob, or a regex with the ``re:`` prefix).
Rules apply in order; for every field the last matching rule wins.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from diffq.config import QuantArgsConfig
from diffq.errors import ConfigError
from diffq.formats import Format, IntFormat, make_format
from diffq.quantizer import Quantizer

log = logging.getLogger(__name__)

_ARG_FIELDS = {f.name for f in fields(QuantArgsConfig)}


@dataclass(frozen=True)
class TensorQuant:
    """Fully resolved quantization of one tensor (a weight or an input activation)."""

    format: str = "int"
    bits: int = 8
    exp: int | None = None
    man: int | None = None
    granularity: str = "tensor"
    symmetric: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    momentum: float | None = None
    dynamic: bool = False
    learnable: bool = False
    bases: int = 2

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> "TensorQuant":
        """Build from a (possibly OmegaConf) mapping, rejecting unknown keys."""
        unknown = set(values) - _ARG_FIELDS
        if unknown:
            raise ConfigError(
                f"{where}: unknown quantization key(s) {sorted(unknown)}; valid keys are {sorted(_ARG_FIELDS)}"
            )
        return cls(**{k: values[k] for k in values})

    def merged(self, partial: Mapping[str, Any] | None, where: str) -> "TensorQuant":
        """A copy with the keys of ``partial`` overriding this one's."""
        if not partial:
            return self
        unknown = set(partial) - _ARG_FIELDS
        if unknown:
            raise ConfigError(
                f"{where}: unknown quantization key(s) {sorted(unknown)}; valid keys are {sorted(_ARG_FIELDS)}"
            )
        return replace(self, **dict(partial))

    def build_format(self) -> Format | None:
        """The number format, or None when this tensor stays floating point."""
        return make_format(
            self.format, self.bits, exp=self.exp, man=self.man, symmetric=self.symmetric, bases=self.bases
        )

    def build_quantizer(self, kind: str, feature_axis: int = -1, name: str = "") -> Quantizer | None:
        """A Quantizer module for this tensor, or None when it stays floating point."""
        fmt = self.build_format()
        if fmt is None:
            return None
        q = Quantizer(
            fmt,
            kind=kind,
            granularity=self.granularity,
            symmetric=self.symmetric,
            observer=self.observer,
            percentile=self.percentile,
            momentum=self.momentum,
            dynamic=self.dynamic,
            feature_axis=feature_axis,
            learnable=self.learnable,
        )
        q.name = name
        return q

    def describe(self) -> str:
        """Short human label, e.g. ``int8/channel/sym`` or ``fp8_e4m3/tensor``."""
        fmt = self.build_format()
        if fmt is None:
            return "fp"
        sym = ("/sym" if self.symmetric else "/asym") if isinstance(fmt, IntFormat) else ""
        dyn = "/dyn" if self.dynamic else ""
        return f"{fmt.name}/{self.granularity}{sym}{dyn}"


@dataclass(frozen=True)
class Rule:
    """One ordered rule of the grammar."""

    index: int
    roles: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    weight: Mapping[str, Any] | None = None
    act: Mapping[str, Any] | None = None
    skip: bool | None = None

    def matches(self, name: str, role: str) -> bool:
        """Whether this rule applies to the layer ``name`` with role ``role``."""
        if self.roles and role not in self.roles:
            return False
        if not self.names:
            return True
        return any(_name_matches(pattern, name) for pattern in self.names)


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class LayerSpec:
    """What one quantizable layer gets after rule resolution."""

    name: str
    role: str
    kind: str  # linear | conv2d
    weight: TensorQuant | None
    act: TensorQuant | None
    skip: bool = False
    params: int = 0
    rules: list[int] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        """True when the weight or the input activation is quantized."""
        return not self.skip and (self.weight is not None or self.act is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used by export metadata and spec.txt)."""
        return {
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "weight": None if self.weight is None else asdict(self.weight),
            "act": None if self.act is None else asdict(self.act),
            "skip": self.skip,
            "params": self.params,
            "rules": self.rules,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            role=d["role"],
            kind=d["kind"],
            weight=None if d["weight"] is None else TensorQuant(**d["weight"]),
            act=None if d["act"] is None else TensorQuant(**d["act"]),
            skip=bool(d["skip"]),
            params=int(d.get("params", 0)),
            rules=list(d.get("rules", [])),
        )


def parse_rules(rules: Iterable[Mapping[str, Any]], valid_roles: Sequence[str]) -> list[Rule]:
    """Turn config rules into :class:`Rule` objects, checking role names and regexes."""
    parsed = []
    for i, r in enumerate(rules):
        r = dict(r)
        roles = tuple(r.get("roles") or ())
        bad = [x for x in roles if x not in valid_roles]
        if bad:
            raise ConfigError(f"quant.rules[{i}]: unknown role(s) {bad}; valid roles are {list(valid_roles)}")
        names = tuple(r.get("names") or ())
        for pattern in names:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"quant.rules[{i}]: bad regex {pattern!r} ({e}); fix the pattern") from e
        parsed.append(
            Rule(index=i, roles=roles, names=names, weight=r.get("weight"), act=r.get("act"), skip=r.get("skip"))
        )
    return parsed


def _reduction_size(module: nn.Module) -> int:
    w = module.weight
    return int(w[0].numel())


def _feature_size(module: nn.Module) -> int:
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)


def _check_granularity(tq: TensorQuant, size: int, where: str) -> None:
    g = tq.granularity
    if g.startswith("group:"):
        try:
            group = int(g.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"{where}: bad granularity {g!r}; write group:<size>, e.g. group:64") from e
        if group <= 0 or size % group:
            divisors = [d for d in (16, 32, 64, 128) if size % d == 0]
            raise ConfigError(
                f"{where}: group size {group} does not divide the {size} channels it groups; "
                f"pick a divisor of {size} (e.g. {divisors or [size]})"
            )
    elif g == "block":
        fmt = tq.build_format()
        block = getattr(fmt, "block_size", None)
        if block is None:
            raise ConfigError(f"{where}: granularity 'block' needs a block format (nvfp4 or mxfp4), got {fmt.name}")
        if size % block:
            raise ConfigError(
                f"{where}: {fmt.name} blocks of {block} do not divide the {size} channels; "
                "skip this layer with a rule or use another format"
            )
    elif g not in ("tensor", "channel", "token"):
        raise ConfigError(f"{where}: unknown granularity {g!r}; use tensor, channel, token, group:<g> or block")


def validate_quant_args(weight: Mapping[str, Any], act: Mapping[str, Any]) -> tuple[TensorQuant, TensorQuant]:
    """Check the default weight/activation formats before any model is loaded."""
    wq = TensorQuant.from_mapping(weight, "quant.weight")
    aq = TensorQuant.from_mapping(act, "quant.act")
    for tq, where in ((wq, "quant.weight"), (aq, "quant.act")):
        try:
            tq.build_format()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
    if wq.granularity == "token":
        raise ConfigError("quant.weight: granularity 'token' is for activations; use channel or group:<g>")
    return wq, aq


def resolve_spec(
    layers: Mapping[str, tuple[str, nn.Module]],
    weight: Mapping[str, Any],
    act: Mapping[str, Any],
    rules: Iterable[Mapping[str, Any]],
    valid_roles: Sequence[str],
    strict: bool = False,
) -> list[LayerSpec]:
    """Resolve the grammar for every layer ``name -> (role, module)``.

    Raises ConfigError for bad formats or group sizes; a rule matching no layer is a warning,
    or an error when ``strict``.
    """
    base_w, base_a = validate_quant_args(weight, act)
    parsed = parse_rules(rules, valid_roles)
    hits = {r.index: 0 for r in parsed}
    specs = []
    for name, (role, module) in layers.items():
        wq, aq, skip, matched = base_w, base_a, False, []
        for rule in parsed:
            if not rule.matches(name, role):
                continue
            hits[rule.index] += 1
            matched.append(rule.index)
            where = f"quant.rules[{rule.index}] on {name}"
            wq = wq.merged(rule.weight, where)
            aq = aq.merged(rule.act, where)
            if rule.skip is not None:
                skip = bool(rule.skip)
        w_out = None if wq.build_format() is None else wq
        a_out = None if aq.build_format() is None else aq
        if not skip:
            if w_out is not None:
                _check_granularity(w_out, _reduction_size(module), f"weight of {name}")
                if w_out.granularity == "token":
                    raise ConfigError(f"weight of {name}: granularity 'token' is for activations")
            if a_out is not None:
                _check_granularity(a_out, _feature_size(module), f"input activation of {name}")
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        specs.append(
            LayerSpec(name, role, kind, w_out, a_out, skip, params=int(module.weight.numel()), rules=matched)
        )
    for rule in parsed:
        if hits[rule.index] == 0:
            msg = (
                f"quant.rules[{rule.index}] (roles={list(rule.roles)}, names={list(rule.names)}) matches no layer; "
                "check the role/name spelling (see spec.txt for the real names and roles)"
            )
            if strict:
                raise ConfigError(msg)
            log.warning(msg)
    return specs


def format_spec_table(specs: Sequence[LayerSpec]) -> str:
    """The per-layer table written to spec.txt."""
    header = ("layer", "role", "type", "params", "weight", "act", "skipped")
    rows = [
        (
            s.name,
            s.role,
            s.kind,
            str(s.params),
            "fp" if (s.skip or s.weight is None) else s.weight.describe(),
            "fp" if (s.skip or s.act is None) else s.act.describe(),
            "yes" if s.skip else "no",
        )
        for s in specs
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt_row(header), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(r) for r in rows]
    n_q = sum(s.quantized for s in specs)
    lines.append(f"\n{n_q} of {len(specs)} layers quantized")
    return "\n".join(lines) + "\n"
