"""The bit-config grammar: default formats plus ordered rules, resolved per layer.

A rule matches a layer when its ``roles`` (if any) contain the layer's role, its ``kinds`` (if any)
the layer's type (``linear``, ``conv2d``) AND one of its ``names`` (if any) matches the layer name
(shell glob, or a regex with the ``re:`` prefix).
Rules apply in order; for every field the last matching rule wins.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from diffq.errors import ConfigError
from diffq.layout import Granularity, Layout
from diffq.observers import make_observer
from diffq.tensor_quant import TensorQuant

log = logging.getLogger(__name__)

BOS_ROLES = ("cross_attn_kv",)  # layers whose input is the text encoder's sequence
KINDS = ("linear", "conv2d")  # layer types a rule's ``kinds`` matches


@dataclass(frozen=True)
class Rule:
    """One ordered rule of the grammar."""

    index: int
    roles: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    weight: Mapping[str, Any] | None = None
    act: Mapping[str, Any] | None = None
    skip: bool | None = None
    bos: bool | None = None

    def matches(self, name: str, role: str, kind: str | None = None) -> bool:
        """Whether this rule applies to the layer ``name`` with role ``role`` (and type ``kind``)."""
        if self.roles and role not in self.roles:
            return False
        if self.kinds and kind not in self.kinds:
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
    bos: bool = False  # token 0 of the text sequence through the FP weight (MixDQ), outside the quantizers

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
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "skip": self.skip,
            "params": self.params,
            "rules": self.rules,
            "bos": self.bos,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            role=d["role"],
            kind=d["kind"],
            weight=None if d["weight"] is None else TensorQuant.from_mapping(d["weight"], f"{d['name']}.weight"),
            act=None if d["act"] is None else TensorQuant.from_mapping(d["act"], f"{d['name']}.act"),
            skip=bool(d["skip"]),
            params=int(d.get("params", 0)),
            rules=list(d.get("rules", [])),
            bos=bool(d.get("bos", False)),
        )


def parse_rules(rules: Iterable[Mapping[str, Any]], valid_roles: Sequence[str], where: str = "quant.rules",
                start: int = 0) -> list[Rule]:
    """Turn config rules into :class:`Rule` objects, checking role names, regexes and the types of
    their ``weight`` / ``act`` settings; errors name the rule as ``<where>[i]`` (i from ``start``)."""
    parsed = []
    for i, r in enumerate(rules, start):
        r = dict(r)
        roles = tuple(r.get("roles") or ())
        bad = [x for x in roles if x not in valid_roles]
        if bad:
            raise ConfigError(f"{where}[{i}]: unknown role(s) {bad}; valid roles are {list(valid_roles)}")
        kinds = tuple(r.get("kinds") or ())
        bad = [x for x in kinds if x not in KINDS]
        if bad:
            raise ConfigError(f"{where}[{i}]: unknown kind(s) {bad}; valid kinds are {list(KINDS)}")
        names = tuple(r.get("names") or ())
        for pattern in names:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"{where}[{i}]: bad regex {pattern!r} ({e}); fix the pattern") from e
        weight = TensorQuant.check_partial(r.get("weight"), f"{where}[{i}].weight")
        act = TensorQuant.check_partial(r.get("act"), f"{where}[{i}].act")
        parsed.append(Rule(index=i, roles=roles, names=names, kinds=kinds, weight=weight, act=act, skip=r.get("skip"),
                           bos=r.get("bos")))
    return parsed


def _feature_size(module: nn.Module, what: str) -> int:
    """Size of the axis groups run along: input features (convolutions: input channels, per kernel position)."""
    if what == "weight":
        return int(module.weight.shape[1])
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)


def check_tensor(tq: TensorQuant, kind: str, size: int, where: str) -> None:
    """ConfigError when ``tq`` cannot quantize a ``kind`` tensor whose grouped axis has ``size`` elements."""
    try:
        fmt = tq.build_format()
        gran = Granularity.parse(tq.granularity)
        if fmt is not None:
            layout = Layout(kind, gran)  # the quantizer's own checks of kind, granularity and observer
            fmt.check_usage(kind=kind, granularity=gran.kind, symmetric=tq.symmetric, observer=tq.observer)
            dynamic = tq.dynamic or (kind == "act" and gran.kind in ("token", "group", "block"))
            make_observer(tq.observer, layout, tq.symmetric, dynamic, percentile=tq.percentile, momentum=tq.momentum)
            tq.check_timestep_groups(kind)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if fmt is None:
        return
    group = gran.size if gran.kind == "group" else fmt.block_size if gran.kind == "block" else None
    if group and size % group:
        divisors = [d for d in (16, 32, 64, 128) if size % d == 0]
        what = f"{fmt.name} blocks of {group}" if gran.kind == "block" else f"group size {group}"
        raise ConfigError(
            f"{where}: {what} does not divide the {size} channels it groups; pick a divisor of {size} "
            f"(e.g. {divisors or [size]}), skip this layer with a rule or use another format"
        )


def validate_quant_args(weight: Mapping[str, Any], act: Mapping[str, Any]) -> tuple[TensorQuant, TensorQuant]:
    """Check the default weight/activation formats before any model is loaded."""
    wq = TensorQuant.from_mapping(weight, "quant.weight")
    aq = TensorQuant.from_mapping(act, "quant.act")
    check_tensor(wq, "weight", 0, "quant.weight")
    check_tensor(aq, "act", 0, "quant.act")
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
        wq, aq, skip, bos, matched = base_w, base_a, False, False, []
        kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
        for rule in parsed:
            if not rule.matches(name, role, kind):
                continue
            hits[rule.index] += 1
            matched.append(rule.index)
            wq, aq = wq.merged(rule.weight), aq.merged(rule.act)
            if rule.skip is not None:
                skip = bool(rule.skip)
            if rule.bos is not None:
                bos = bool(rule.bos)
        if bos and role not in BOS_ROLES:
            raise ConfigError(f"quant.rules{matched}: bos applies to the text sequence's K/V projections only, but "
                              f"matches {name} (role {role}); add roles: [cross_attn_kv] to the rule")
        where = f" (rules {matched})" if matched else ""
        w_out = None if wq.build_format() is None else wq
        a_out = None if aq.build_format() is None else aq
        if not skip:
            if w_out is not None:
                check_tensor(w_out, "weight", _feature_size(module, "weight"), f"weight of {name}{where}")
            if a_out is not None:
                check_tensor(a_out, "act", _feature_size(module, "act"), f"input activation of {name}{where}")
        specs.append(
            LayerSpec(name, role, kind, w_out, a_out, skip, params=int(module.weight.numel()), rules=matched, bos=bos)
        )
    for rule in parsed:
        if hits[rule.index] == 0:
            msg = (
                f"quant.rules[{rule.index}] (roles={list(rule.roles)}, kinds={list(rule.kinds)}, "
                f"names={list(rule.names)}) matches no layer; "
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
            "float" if (s.skip or s.weight is None) else s.weight.describe(),
            ("float" if (s.skip or s.act is None) else s.act.describe()) + (" +bos fp" * (s.bos and s.quantized)),
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
