"""Every config key is documented once (config_docs.KEY_DOCS), docs/config.md is current, and the README's
key table states the defaults the code has."""

from __future__ import annotations

import re
from pathlib import Path

from dtr_scale import config
from dtr_scale.config_docs import KEY_DOCS, PUBLIC_KEYS, config_fields, key_row, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented_and_nothing_else():
    keys = set(config_fields())
    assert keys - set(KEY_DOCS) == set(), "keys without documentation"
    assert set(KEY_DOCS) - keys == set(), "documentation of keys that do not exist"
    assert all(unit and len(meaning) > 10 for unit, meaning in KEY_DOCS.values())


def test_defaults_are_read_from_the_dataclasses():
    fields = config_fields()
    # hand-picked against config/schema.py's source text
    assert fields["train.lr"][1] == 1e-4 and fields["deepspeed.zero_stage"][1] == 2
    assert fields["monitor.sample_classes"][1] == [207, 360, 387, 974, 88, 979, 417, 279]
    assert fields["train.micro_batch_size"][1] is None
    assert config.RunConfig().train.ema_decay == fields["train.ema_decay"][1] == 0.9999


def test_docs_config_md_is_current():
    assert (REPO / "docs/config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: python -m dtr_scale.config_docs > docs/config.md"
    )


def test_readme_key_table_matches_the_code():
    readme = (REPO / "README.md").read_text()
    rows = {
        m.group(1): line for line in readme.splitlines() if (m := re.match(r"\| `([a-z_.0-9]+)` \| ", line))
    }
    assert set(rows) == set(PUBLIC_KEYS)
    for key, line in rows.items():
        assert line == key_row(key), key
