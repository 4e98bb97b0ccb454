"""Every setting is checked before any stage runs: a wrong value of any field of the run config, of any metric's
``score.params`` or any selector's ``select.params`` fails in one line naming the key, and writes nothing."""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from datapruning.config import RunConfig, load_config
from datapruning.consumers.teacher import TeacherConfig
from datapruning.errors import ConfigError
from datapruning.runner import check_config, run_pipeline
from datapruning.score import METRICS
from datapruning.select import SELECTORS

METRIC_NEEDS = {"clip_score": ["embed.modality=pair"], "text_match": ["score.params.text_match.names=[cat]"]}
NEEDS = {  # settings a metric needs to be valid at all (so the field under test is the only wrong one)
    "dp4tl_lm": {"target": "t.npy"}, "dp4tl_fm": {"target": "t.npy"}, "el2n": {},
}
SELECTOR_METRIC = {"rank": "ssp", "balanced": "ssp", "ccs": "el2n", "groups": "dp4tl_lm", "dbp": None,
                   "threshold": "clip_score"}
SELECTOR_NEEDS = {"threshold": ["embed.modality=pair", "select.params.threshold=0.28"]}


def yaml_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return json.dumps(value)


def wrong_values(tp, meta) -> list:
    """Values of the wrong type or outside a field's choices and range."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union or type(None) in typing.get_args(tp):
        tp = args[0]
    origin = typing.get_origin(tp)
    if origin is tuple:
        return [5, {"a": 1}] + ([[v] for v in wrong_values(typing.get_args(tp)[0], meta) if not isinstance(v, list)]
                                if typing.get_args(tp) else [])
    if origin is not None and "Mapping" in str(origin) or tp is typing.Mapping:
        return [5, [1, 2]]
    out = {bool: ["false", 1, "yes"], int: ["abc", 2.5, True, math.inf, [1]], float: ["abc", True, math.nan, {"a": 1}],
           str: [5, [1], {"a": 1}]}.get(tp, [])
    if tp is float and meta.get("finite", True):
        out.append(math.inf)
    if "choices" in meta:
        out.append("no-such-choice")
    for bound, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if bound in meta:
            v = meta[bound] + step
            out.append(int(v) if tp is int else float(v))
    return out


def fields_of(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from fields_of(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata


def cases():
    """(overrides, key) for a wrong value of every field: the run config, every metric, every selector."""
    for key, tp, meta in fields_of(RunConfig):
        if key in ("score.params", "select.params"):
            continue
        for v in wrong_values(tp, meta):
            yield [f"{key}={yaml_value(v)}"], key
    for name, metric in METRICS.items():
        base = [f"score.metrics=[{name}]", "select.method=dbp", *METRIC_NEEDS.get(name, [])]
        base += [f"score.params.{name}.{k}={yaml_value(v)}" for k, v in NEEDS.get(name, {}).items()]
        for key, tp, meta in fields_of(metric.params):
            for v in wrong_values(tp, meta):
                yield base + [f"score.params.{name}.{key}={yaml_value(v)}"], f"score.params.{name}.{key}"
    for name, selector in SELECTORS.items():
        metric = SELECTOR_METRIC[name]
        base = [f"select.method={name}", f"score.metrics=[{metric or 'ssp'}]", *SELECTOR_NEEDS.get(name, [])]
        base += [f"score.params.{metric}.{k}={yaml_value(v)}" for k, v in NEEDS.get(metric, {}).items()]
        for key, tp, meta in fields_of(selector.params):
            full = f"select.{key}" if key in selector.common else f"select.params.{key}"
            for v in wrong_values(tp, meta):
                yield base + [f"{full}={yaml_value(v)}"], full


ALL = list(cases())


def test_every_wrong_value_fails_in_one_line_naming_the_key_and_writes_nothing(tmp_path):
    assert len(ALL) > 200
    missed = []
    for overrides, key in ALL:
        try:
            cfg = load_config(None, overrides)
            check_config(cfg)
        except ConfigError as exc:
            text = str(exc)
            if key not in text or "\n" in text or len(text) > 600:
                missed.append(f"{overrides}: {text[:300]}")
            continue
        out = tmp_path / "never"
        with pytest.raises(ConfigError):
            run_pipeline(cfg, str(tmp_path), out)
        missed.append(f"{overrides}: accepted")
    assert not missed, f"{len(missed)} of {len(ALL)} wrong settings were not refused by key:\n" + "\n".join(missed[:20])


def test_run_pipeline_refuses_before_writing(tmp_path):
    cfg = load_config(None, ["select.metric=el2n", "score.metrics=[ssp]"])
    with pytest.raises(ConfigError, match="'select.metric'.*not in score.metrics"):
        run_pipeline(cfg, str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["score.params.el2n.from_logits=\"false\""], "'score.params.el2n.from_logits': expected true or false"),
    (["score.params.dp4tl_lm.max_samples=true"], "'score.params.dp4tl_lm.max_samples': expected an integer"),
    (["score.params.el2n.epochs=2.5"], "'score.params.el2n.epochs': expected an integer"),
    (["score.params.el2n.lr=.inf"], "'score.params.el2n.lr': expected a finite number"),
    (["select.method=dbp", "select.params.tau=.inf"], "'select.params.tau': expected a finite number"),
    (["select.method=dbp", "select.metric=ssp"], "--set select.metric=null"),
    (["score.metrics=[]"], "'score.metrics': give at least one metric"),
    (["select.metric=typo"], "'select.metric'"),
])
def test_the_issue_cases(overrides, message):
    base = {"el2n": ["score.metrics=[el2n]", "select.method=ccs"],
            "dp4tl_lm": ["score.metrics=[dp4tl_lm]", "select.method=groups", "score.params.dp4tl_lm.target=t.npy"]}
    extra = next((v for k, v in base.items() if k in overrides[0]), [])
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, extra + overrides))
    assert message in str(err.value)


def test_yaml_1_1_number_spellings_are_numbers():
    cfg = load_config(None, ["score.metrics=[el2n]", "select.method=ccs", "score.params.el2n.lr=1e-2"])
    assert METRICS["el2n"].parse(cfg.score.params["el2n"], 0).lr == 0.01
    assert load_config(None, ["select.keep_fraction=5e-1"]).select.keep_fraction == 0.5


def test_teacher_settings_are_checked_on_construction():
    with pytest.raises(ConfigError, match="'teacher.batch_size'"):
        TeacherConfig(classes=("a",), batch_size=0)
    with pytest.raises(ConfigError, match="'teacher.top_k'"):
        TeacherConfig(classes=("a",), top_k=True)
