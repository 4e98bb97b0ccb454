"""Config: YAML + dotted overrides into frozen dataclasses, every error naming its key."""
from __future__ import annotations

import dataclasses
import time

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
    ("cluster.k=0", "'cluster.k': must be in [1, 10000000], got 0"),
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


# ---- bounded parsing: sizes, alias bombs, recursion, ranges, short echoes --------------------------------

ALIAS_BOMB = ("{a: &a [x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
              "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
              "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], "
              "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]}")


@pytest.mark.parametrize("item, message", [
    (f"select.params={ALIAS_BOMB}", "more than 100000 values"),
    (f"embed.model={ALIAS_BOMB}", "more than 100000 values"),
    ("select.params=&a [*a]", "nested deeper than"),
    ("embed.model=" + "[" * 3000 + "]" * 3000, "nested too deep"),
    ("embed.model=" + "x" * 120_000, "more than the 65536 allowed"),
    ("seed=1099511627776", "'seed': must be in [0, 2147483647]"),
    ("seed=-1", "'seed': must be in"),
    ("cluster.niter=100000000000", "'cluster.niter': must be in [1, 100000]"),
    ("cluster.niter=1000000", "'cluster.niter': must be in [1, 100000]"),
    ("cluster.k=100000000", "'cluster.k': must be in [1, 10000000]"),
    ("score.params.ssp=5", "'score.params.ssp': expected a mapping of parameters, got 5"),
    ("select.keep_fraction=.nan", "expected a finite number, got nan"),
    ("input.retries=-1", "'input.retries': must be in [0, 100]"),
])
def test_bounded_config_values(item, message):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert message in str(err.value)
    assert len(str(err.value)) < 400 and time.monotonic() - start < 10


def test_errors_echo_at_most_200_characters_of_a_value(tmp_path):
    for item in ("cluster.k=" + "9" * 50_000 + "x", "x" * 120_000 + "=1", "embed.model=[" + "1," * 20_000 + "1]"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [item])
        assert len(str(err.value)) < 500, str(err.value)[:100]
    big = tmp_path / "big.yaml"
    big.write_text("seed: " + "1" * (2 << 20))
    with pytest.raises(ConfigError, match="more than the 1048576 allowed"):
        load_config(big)


def test_recursion_never_escapes_from_a_config_file(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("select:\n  params: &a\n    x: *a\n")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(path)
