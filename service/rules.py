"""How a rule picks a codec: ordered rules, first match wins, codecs tried in order.

A rule matches on a few attributes of the received object (and the calling AE title);
each match key takes a single value (equality), a list (any of) or, for numbers, a
`{ min = .., max = .. }` range. The chosen rule names codecs in order of preference; the
compression runner tries them in that order and always ends with storing as received,
so a rule can never lose an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset

from compacs.codecs import registry
from compacs.codecs.base import PixelFormat

# Match key -> type of its values. CallingAETitle is not a DICOM attribute: it is the
# AE title of the sender, so that a rule can treat one modality or PACS differently.
MATCH_KEYS: dict[str, type] = {
    "Modality": str,
    "SOPClassUID": str,
    "CallingAETitle": str,
    "BitsStored": int,
    "PhotometricInterpretation": str,
    "NumberOfFrames": int,
}


@dataclass(frozen=True)
class CodecChoice:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """One match key: `values` (any of) or an inclusive numeric range."""

    key: str
    values: tuple[Any, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    def test(self, value: Any) -> bool:
        if value is None:
            return False
        if self.values:
            return value in self.values
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )

    def describe(self) -> str:
        if self.values:
            return " or ".join(repr(v) for v in self.values)
        lo = "" if self.minimum is None else f"{self.minimum}"
        hi = "" if self.maximum is None else f"{self.maximum}"
        return f"range {lo}..{hi}"


@dataclass(frozen=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]
    codecs: tuple[CodecChoice, ...]

    def mismatches(self, attrs: dict[str, Any]) -> list[str]:
        """Why this rule does not match `attrs` (empty when it does)."""
        return [
            f"{c.key} is {attrs.get(c.key)!r}, rule wants {c.describe()}"
            for c in self.conditions
            if not c.test(attrs.get(c.key))
        ]


def object_attributes(ds: Dataset, calling_ae: str = "") -> dict[str, Any]:
    """The values rules match on, read once per object."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value is None else str(value).strip()

    def number(keyword: str, default: int | None = None) -> int | None:
        value = ds.get(keyword)
        try:
            return int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default

    has_pixels = "PixelData" in ds
    return {
        "Modality": text("Modality"),
        "SOPClassUID": text("SOPClassUID"),
        "CallingAETitle": calling_ae.strip(),
        "BitsStored": number("BitsStored"),
        "PhotometricInterpretation": text("PhotometricInterpretation"),
        "NumberOfFrames": number("NumberOfFrames", 1 if has_pixels else None),
    }


def parse_condition(key: str, spec: Any, where: str) -> Condition:
    if key not in MATCH_KEYS:
        raise ValueError(
            f"{where} match key {key!r} is unknown; allowed keys: {', '.join(MATCH_KEYS)}"
        )
    kind = MATCH_KEYS[key]
    where = f"{where} match.{key}"
    if isinstance(spec, dict):
        if kind is not int:
            raise ValueError(f"{where}: ranges are only for numeric keys; give a value or a list")
        bad = set(spec) - {"min", "max"}
        if bad or not spec:
            raise ValueError(f"{where}: a range is {{ min = N, max = N }}, got keys {sorted(spec)}")
        for bound in spec.values():
            if not isinstance(bound, int) or isinstance(bound, bool):
                raise ValueError(f"{where}: range bounds must be integers, got {bound!r}")
        return Condition(key, minimum=spec.get("min"), maximum=spec.get("max"))
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise ValueError(
            f"{where}: an empty list matches nothing; remove the key to match anything"
        )
    for value in values:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: values must be {kind.__name__}s, got {value!r}")
    return Condition(key, values=tuple(v.strip() if isinstance(v, str) else v for v in values))


def parse_codec(spec: Any, where: str) -> CodecChoice:
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and set(spec) <= {"codec", "params"} and "codec" in spec:
        name, params = spec["codec"], spec.get("params", {})
    else:
        raise ValueError(
            f'{where}: a codec is a name or {{ codec = "NAME", params = {{ ... }} }}, got {spec!r}'
        )
    if name not in registry.names():
        raise ValueError(f"{where}: unknown codec {name!r}; allowed: {', '.join(registry.names())}")
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a table, got {params!r}")
    try:
        registry.get(name).check_params(params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return CodecChoice(name, dict(params))


def parse_rules(raw: Any) -> list[Rule]:
    """Validate the [[rules]] array of tables; errors name the rule and the key."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("[[rules]] must be a non-empty array of tables")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: each rule must be a table")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f'{where}: every rule needs a name = "..."')
        where = f"rule {name!r} ({where})"
        if name in seen:
            raise ValueError(f"{where}: the name is used by an earlier rule; names must be unique")
        seen.add(name)
        unknown = sorted(set(item) - {"name", "match", "codecs"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: name, match, codecs"
            )
        match = item.get("match", {})
        if not isinstance(match, dict):
            raise ValueError(f'{where} match: must be a table, e.g. match = {{ Modality = "CT" }}')
        codecs = item.get("codecs")
        if not isinstance(codecs, list) or not codecs:
            raise ValueError(
                f'{where} codecs: must be a non-empty list, e.g. codecs = ["jpegls"]; '
                f"allowed codecs: {', '.join(registry.names())}"
            )
        rules.append(
            Rule(
                name=name,
                conditions=tuple(parse_condition(k, v, where) for k, v in match.items()),
                codecs=tuple(parse_codec(c, f"{where} codecs[{j}]") for j, c in enumerate(codecs)),
            )
        )
    return rules


def codec_names(rules: list[Rule]) -> list[str]:
    """The codecs the rules name, each once, in order of first mention."""
    return list(dict.fromkeys(choice.name for rule in rules for choice in rule.codecs))


def unavailable_choices(owners: list[tuple[str, tuple[CodecChoice, ...]]]) -> list[str]:
    """One line per codec of a rule or tier (`owners`: ("rule 'x'", its codecs)) that cannot
    run here, saying what is done instead: the node logs them once at start, and compress()
    (or a tier move) then skips such a codec for the next one without a word."""
    lines = []
    for owner, choices in owners:
        for i, choice in enumerate(choices):
            codec = (
                registry.get_volume(choice.name)
                if choice.name in registry.volume_names()
                else registry.get(choice.name)
            )
            reason = codec.unavailable_reason()
            if reason is None:
                continue
            rest = [c.name for c in choices[i + 1 :]]
            instead = f"the next codec, {rest[0]}" if rest else "none: stored as they are"
            lines.append(
                f"{owner}: codec {choice.name} is not available ({reason}); instead: {instead}"
            )
    return lines


def select(rules: list[Rule], attrs: dict[str, Any]) -> Rule | None:
    """The first rule that matches, or None (the object is then stored as received)."""
    return next((r for r in rules if not r.mismatches(attrs)), None)


def explain(
    rules: list[Rule], attrs: dict[str, Any], fmt: PixelFormat | None, kept: str | None = None
) -> list[str]:
    """A readable account of which rule matches and which codec it would use, and why.
    `kept`: why the object is kept as received whatever the rule (compress.kept_as_received)."""
    lines = [f"object: {', '.join(f'{k}={v!r}' for k, v in attrs.items())}"]
    if kept is not None:
        lines.append(f"kept as received, no codec tried: {kept}")
        return lines
    chosen = None
    for rule in rules:
        misses = rule.mismatches(attrs)
        if misses:
            lines.append(f"rule {rule.name!r}: no match ({'; '.join(misses)})")
            continue
        lines.append(f"rule {rule.name!r}: MATCHES")
        chosen = rule
        break
    if chosen is None:
        lines.append("no rule matches: stored as received")
        return lines
    decided = False
    for choice in chosen.codecs:
        codec = registry.get(choice.name)
        if decided:
            lines.append(f"  codec {choice.name}: fallback if the one above fails verification")
            continue
        if not codec.is_available():
            reason = codec.unavailable_reason()
        elif fmt is None and codec.transfer_syntax_uid:
            reason = "the object has no pixel data"
        else:
            reason = codec.unsupported_reason(fmt) if fmt is not None else None
        if reason:
            lines.append(f"  codec {choice.name}: skipped: {reason}")
        else:
            lines.append(f"  codec {choice.name}: WOULD BE USED (then verified bit-exact)")
            decided = True
    if not decided:
        lines.append("  no codec of the rule can take it: stored as received")
    return lines
