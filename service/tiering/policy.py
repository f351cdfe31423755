"""The tiers of the config and which objects are due to move to which.

    [[tiers]]
    name = "cold"                      # letters, digits, - and _; not "hot"
    root = "/srv/compacs-cold"          # its storage root (default: <data_dir>/tiers/<name>),
                                       # or a bucket: "s3://bucket/prefix" (storage/objectstore.py)
    s3 = { endpoint_url = "https://minio.example:9000", region = "us-east-1" }
                                       # a bucket's store, when not AWS S3; credentials:
                                       # access_key_id and secret_access_key here, or (better)
                                       # boto3's chain: AWS_ACCESS_KEY_ID, a profile, a role
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
from compacs.service.storage.blobstore import S3_SCHEME, StoreSpec
from compacs.service.storage.schema import HOT_TIER

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,15}$")
FORMS = ("instance", "volume")
CHOICES = ("first", "smallest")
SINCE = ("received", "accessed")
INDEXED_KEYS = ("Modality", "SOPClassUID", "CallingAETitle", "BitsStored", "NumberOfFrames")
_KEYS = ("name", "root", "s3", "after_days", "since", "match", "codecs", "form", "choose")
_S3_KEYS = ("endpoint_url", "region", "access_key_id", "secret_access_key")
# S3's bucket naming rules (what AWS, MinIO and Ceph RGW all accept)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Tier:
    name: str
    store: StoreSpec  # its root: a folder or a bucket
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
        tiers.append(
            Tier(
                name=name,
                store=_parse_store(item, data_dir / "tiers" / name, where),
                after_days=float(after),
                since=since,
                conditions=tuple(parse_condition(k, v, where) for k, v in match.items()),
                codecs=codecs,
                form=form,
                choose=choose,
            )
        )
    return tiers


def _parse_store(item: dict[str, Any], default: Path, where: str) -> StoreSpec:
    """The tier's root, and for a bucket how to reach it."""
    root = item.get("root") or str(default)
    if not isinstance(root, str):
        raise ValueError(f'{where} root: a folder path or "s3://bucket/prefix", got {root!r}')
    s3 = item.get("s3")
    if not root.startswith(S3_SCHEME):
        if s3 is not None:
            raise ValueError(
                f'{where} s3: only for a bucket root (root = "s3://bucket/prefix"); root is '
                f"the folder {root!r}"
            )
        return StoreSpec(root)
    bucket, _, prefix = root[len(S3_SCHEME) :].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{where} root = {root!r}: the bucket name must be 3-63 lower-case letters, digits, "
            '. or -, e.g. root = "s3://compacs-cold/node1"'
        )
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"{where} root = {root!r}: the prefix after the bucket must be folder names "
            'separated by single "/", without "." or ".."'
        )
    s3 = {} if s3 is None else s3
    if not isinstance(s3, dict):
        raise ValueError(
            f'{where} s3: a table, e.g. s3 = {{ endpoint_url = "http://127.0.0.1:9000" }}'
        )
    unknown = sorted(set(s3) - set(_S3_KEYS))
    if unknown:
        raise ValueError(
            f"{where} s3: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_S3_KEYS)}"
        )
    for key, value in s3.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where} s3.{key}: a non-empty string, got {value!r}")
    endpoint = s3.get("endpoint_url")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ValueError(
            f"{where} s3.endpoint_url = {endpoint!r}: an http:// or https:// URL of the "
            "S3-compatible store (leave it out for AWS S3)"
        )
    if ("access_key_id" in s3) != ("secret_access_key" in s3):
        raise ValueError(
            f"{where} s3: access_key_id and secret_access_key go together; give both, or "
            "neither and let boto3 find them (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "in the environment, a profile, a role)"
        )
    return StoreSpec(
        f"{S3_SCHEME}{bucket}/{'/'.join(parts)}",
        endpoint_url=endpoint,
        region=s3.get("region"),
        access_key_id=s3.get("access_key_id"),
        secret_access_key=s3.get("secret_access_key"),
    )


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
