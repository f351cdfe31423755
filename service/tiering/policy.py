"""The tiers of the config and which objects are due to move to which.

    [[tiers]]
    name = "cold"                      # letters, digits, - and _; not "hot"
    root = "/srv/compacs-cold"          # its storage root (default: <data_dir>/tiers/<name>)
    after_days = 90                     # due this long after receipt, or after last access
    since = "received"                  # received | accessed
    match = { Modality = ["CT", "MR"] } # which objects ([[rules]]' match keys); {}: all
    codecs = ["jpegxl", "hevc"]         # frame codecs and volume codecs to try
    form = "volume"                     # instance | volume (series of slices coded together)
    choose = "smallest"                 # first (that qualifies and verifies) | smallest

Tiers are listed from warm to cold; an object goes to the coldest tier it is due for and
never back to a warmer one. Tiers are lossless: a bounded-error codec (a learned delta) is
for [[rules]] only, where the lossy derivation is explicit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from compacs.codecs import registry
from compacs.service.rules import CodecChoice, Condition, parse_codec, parse_condition
from compacs.service.storage.schema import HOT_TIER

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,15}$")
FORMS = ("instance", "volume")
CHOICES = ("first", "smallest")
SINCE = ("received", "accessed")
INDEXED_KEYS = ("Modality", "SOPClassUID", "CallingAETitle", "BitsStored", "NumberOfFrames")
_KEYS = ("name", "root", "after_days", "since", "match", "codecs", "form", "choose")


@dataclass(frozen=True)
class Tier:
    name: str
    root: Path
    after_days: float
    since: str
    conditions: tuple[Condition, ...]
    codecs: tuple[CodecChoice, ...]  # in the config's order, frame and volume codecs mixed
    form: str
    choose: str

    def due_before(self, now: datetime) -> datetime:
        """Objects received (or last accessed) before this are due."""
        return now - timedelta(days=self.after_days)

    def matches(self, attrs: dict[str, Any]) -> bool:
        return all(c.test(attrs.get(c.key)) for c in self.conditions)


def parse_tiers(raw: Any, data_dir: Path) -> list[Tier]:
    """Validate the [[tiers]] array of tables; errors name the tier and the key."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("[[tiers]] must be an array of tables")
    tiers: list[Tier] = []
    for i, item in enumerate(raw):
        where = f"tiers[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: each tier must be a table")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name == HOT_TIER:
            raise ValueError(
                f"{where} name: 1-16 lower-case letters, digits, - or _, not {HOT_TIER!r} "
                f"(the tier objects arrive on), got {name!r}"
            )
        where = f"tier {name!r} ({where})"
        if name in {t.name for t in tiers}:
            raise ValueError(f"{where}: the name is used by an earlier tier")
        unknown = sorted(set(item) - set(_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}"
            )
        after = item.get("after_days", 90)
        if isinstance(after, bool) or not isinstance(after, int | float) or after < 0:
            raise ValueError(f"{where} after_days: a number of days >= 0, got {after!r}")
        since, form, choose = (
            item.get(k, d)
            for k, d in (("since", "received"), ("form", "instance"), ("choose", "first"))
        )
        for key, value, allowed in (
            ("since", since, SINCE),
            ("form", form, FORMS),
            ("choose", choose, CHOICES),
        ):
            if value not in allowed:
                raise ValueError(
                    f"{where} {key} = {value!r}: allowed values are {', '.join(allowed)}"
                )
        match = item.get("match", {})
        if not isinstance(match, dict):
            raise ValueError(f'{where} match: must be a table, e.g. match = {{ Modality = "CT" }}')
        codecs = _parse_tier_codecs(item.get("codecs"), where)
        for key in match:
            if key not in INDEXED_KEYS:
                raise ValueError(
                    f"{where} match key {key!r}: a tier matches on what the index holds: "
                    f"{', '.join(INDEXED_KEYS)}"
                )
        root = item.get("root") or str(data_dir / "tiers" / name)
        if not isinstance(root, str):
            raise ValueError(f"{where} root: a folder path, got {root!r}")
        tiers.append(
            Tier(
                name=name,
                root=Path(root),
                after_days=float(after),
                since=since,
                conditions=tuple(parse_condition(k, v, where) for k, v in match.items()),
                codecs=codecs,
                form=form,
                choose=choose,
            )
        )
    return tiers


def _parse_tier_codecs(
    raw: Any, where: str
) -> tuple[tuple[CodecChoice, ...], tuple[CodecChoice, ...]]:
    allowed = [*registry.names(), *registry.volume_names()]
    if not isinstance(raw, list) or not raw:
        raise ValueError(
            f'{where} codecs: a non-empty list, e.g. codecs = ["jpegxl", "hevc"]; '
            f"allowed: {', '.join(n for n in allowed if n != 'passthrough')}"
        )
    codecs = []
    for j, spec in enumerate(raw):
        at = f"{where} codecs[{j}]"
        name = (
            spec if isinstance(spec, str) else spec.get("codec") if isinstance(spec, dict) else None
        )
        if name in registry.volume_names():
            params = spec.get("params", {}) if isinstance(spec, dict) else {}
            try:
                registry.get_volume(name).check_params(params)
            except ValueError as exc:
                raise ValueError(f"{at}: {exc}") from exc
            codecs.append(CodecChoice(name, dict(params)))
            continue
        choice = parse_codec(spec, at)
        codec = registry.get(choice.name)
        if not codec.transfer_syntax_uid:
            raise ValueError(f"{at}: {choice.name} keeps objects as they are: not a tier codec")
        if codec.error_bound(choice.params):
            raise ValueError(
                f"{at}: tiers are lossless; a bounded-error {choice.name} (delta) belongs in "
                "[[rules]], where the lossy derivation is explicit"
            )
        codecs.append(choice)
    return tuple(codecs)
