"""Config: YAML + dotted overrides into frozen dataclasses, every error naming its key."""
from __future__ import annotations

import dataclasses

import pytest

from datapruning.config import ConfigError, RunConfig, load_config, to_dict, config_from_dict


def test_defaults_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  k: 7\nscore:\n  metrics: [ssp, dbp]\n  params:\n    dbp: {tau: 0.2}\n")
    cfg = load_config(path, ["select.keep_fraction=0.3", "select.mode=easy", "score.metrics=ssp,random"])
    assert cfg.cluster.k == 7 and cfg.select.keep_fraction == 0.3 and cfg.select.mode == "easy"
    assert cfg.score.metrics == ("ssp", "random") and cfg.score.params == {"dbp": {"tau": 0.2}}
    assert config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


@pytest.mark.parametrize("override, message", [
    ("cluster.kk=3", "unknown config key 'cluster.kk'"),
    ("cluster.k=0", "'cluster.k': must be >= 1"),
    ("cluster.k=2.5", "'cluster.k': expected an integer"),
    ("select.keep_fraction=2", "'select.keep_fraction': must be in [0, 1]"),
    ("embed.device=tpu", "'embed.device': expected one of"),
    ("strict=maybe", "'strict': expected true or false"),
    ("select=3", "'select': expected a mapping"),
    ("novalue", "expected key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "nope.yaml")


def test_default_is_a_valid_config():
    assert load_config(None) == RunConfig()
