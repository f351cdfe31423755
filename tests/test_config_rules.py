"""Config loading and rule selection: defaults, overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from compacs.codecs.base import PixelFormat
from compacs.service.config import ConfigError, load_config
from compacs.service.rules import explain, object_attributes, select


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "compacs.toml"
    path.write_text(text)
    return path


def test_embedded_defaults(tmp_path: Path) -> None:
    config = load_config(None, env={})
    assert config.ae_title == "COMPACS" and config.port == 11112
    assert config.data_dir == Path("./compacs-data")
    assert config.effective_index_url.startswith("sqlite:///")
    assert [r.name for r in config.rules] == [
        "greyscale-images",
        "colour-images",
        "everything-else",
    ]


def test_example_config_in_deploy_is_valid() -> None:
    example = Path(__file__).parent.parent / "deploy" / "compacs.example.toml"
    config = load_config(example, env={})
    assert config.rules[0].name == "cine-ultrasound"


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nport = 4000\nae_title = "FROMFILE"\n')
    env = {
        "COMPACS_PORT": "5000",
        "COMPACS_INDEX_URL": "postgresql+psycopg://x@h/db",
        "COMPACS_DATA": str(tmp_path / "d"),
        "COMPACS_AE_TITLE": "FROMENV",
    }
    config = load_config(path, env=env)
    assert (config.port, config.ae_title) == (5000, "FROMENV")
    assert config.effective_index_url == "postgresql+psycopg://x@h/db"
    assert config.data_dir == tmp_path / "d"
    config = load_config(path, env=env, overrides={"port": 6000})
    assert config.port == 6000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[node]\non_duplicate = "newest"\n', ["on_duplicate", "keep_first, replace"]),
        ("[node]\nport = 70000\n", ["port", "1 to 65535"]),
        ("[node]\nprot = 1\n", ["prot", "allowed keys"]),
        (
            '[[rules]]\nname = "a"\nmatch = { Modalty = "CT" }\ncodecs = ["jpegls"]\n',
            ["rule 'a'", "Modalty", "allowed keys: Modality"],
        ),
        ('[[rules]]\nname = "a"\ncodecs = ["jpeg-ls"]\n', ["rule 'a'", "jpeg-ls", "jpegls"]),
        (
            '[[rules]]\nname = "a"\nmatch = { Modality = { min = 1 } }\ncodecs = ["rle"]\n',
            ["Modality", "ranges are only for numeric keys"],
        ),
        ('[[rules]]\nname = "a"\ncodecs = []\n', ["rule 'a'", "non-empty"]),
        ("[node\n", ["not valid TOML"]),
        ('[ingest]\nstrict = "yes"\n', ["[ingest] strict", "true or false"]),
        ("[ingest]\nmax_attempts = 0\n", ["[ingest] max_attempts", "from 1 to 1000"]),
        ('[limits]\nidle_timeout = "60"\n', ["[limits] idle_timeout", "a number"]),
        ("[limits]\nmax_assocs = 3\n", ["max_assocs", "allowed keys", "max_associations"]),
        ("[limit]\n", ["unknown table(s) limit", "[limits]"]),
    ],
)
def test_bad_config_names_file_key_and_allowed_values(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_rule_selection_with_lists_ranges_and_calling_ae(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[rules]]
name = "from-old-pacs"
match = { CallingAETitle = "OLDPACS" }
codecs = ["passthrough"]

[[rules]]
name = "low-bit-mr"
match = { Modality = ["MR", "CT"], BitsStored = { min = 1, max = 12 } }
codecs = ["j2k"]

[[rules]]
name = "rest"
codecs = ["jpegls"]
""",
    )
    rules = load_config(path, env={}).rules
    emri = dcmread(get_testdata_file("emri_small.dcm"))  # MR, BitsStored 12
    ct = dcmread(get_testdata_file("CT_small.dcm"))  # CT, BitsStored 16
    assert select(rules, object_attributes(emri, "OLDPACS")).name == "from-old-pacs"
    assert select(rules, object_attributes(emri, "MODALITY")).name == "low-bit-mr"
    assert select(rules, object_attributes(ct, "MODALITY")).name == "rest"


def test_explain_says_why_rules_and_codecs_were_skipped() -> None:
    rules = load_config(None, env={}).rules
    ds = dcmread(get_testdata_file("SC_rgb.dcm"))  # Modality OT, RGB
    lines = explain(rules, object_attributes(ds), PixelFormat.from_dataset(ds))
    text = "\n".join(lines)
    assert "rule 'greyscale-images': no match (Modality is 'OT'" in text
    assert "rule 'everything-else': MATCHES" in text
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    text = "\n".join(explain(rules, object_attributes(ct), PixelFormat.from_dataset(ct)))
    assert "codec jpegls: WOULD BE USED" in text
