"""Config loading, typed overrides and experiment discovery (medjax/train/config.py, experiment.py)."""

import json
import pathlib
import textwrap

import ml_collections
import pytest

from medjax.train.config import (
    ConfigError,
    apply_overrides,
    config_from_json,
    config_to_json,
    load_config,
    parse_value,
)
from medjax.train.experiment import (
    Experiment,
    ExperimentNotFoundError,
    find_experiments_dir,
    list_experiments,
    load_experiment,
)

TOY = pathlib.Path(__file__).parent / "toy_experiments"


def _base():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 10
    c.lr = 0.1
    c.flag = False
    c.name = "unet"
    c.sizes = (1, 2)
    c.maybe = None
    c.model = ml_collections.ConfigDict({"width": 8, "dropout": 0.0, "kinds": ["a"]})
    return c


def test_overrides_are_typed_like_the_existing_field():
    c = apply_overrides(
        _base(),
        [
            "num_steps=20",
            "lr=1e-3",
            "flag=true",
            "name=vnet",
            "sizes=(3, 4, 5)",
            "maybe=[1, 2]",
            "model.width=16",
            "model.dropout=0.5",
            "model.kinds=b,c",
        ],
    )
    assert c.num_steps == 20 and type(c.num_steps) is int
    assert c.lr == 1e-3 and type(c.lr) is float
    assert c.flag is True
    assert c.name == "vnet"
    assert c.sizes == (3, 4, 5) and type(c.sizes) is tuple
    assert c.maybe == [1, 2]
    assert c.model.width == 16 and type(c.model.width) is int
    assert c.model.dropout == 0.5
    assert c.model.kinds == ["b", "c"]


def test_overrides_leave_the_input_config_untouched():
    base = _base()
    apply_overrides(base, ["num_steps=3"])
    assert base.num_steps == 10


@pytest.mark.parametrize(
    ("text", "current", "expected"),
    [
        ("0", True, False),
        ("YES", False, True),
        ("1e3", 5, 1000),
        ("7", 0.5, 7.0),
        ("'quoted'", None, "quoted"),
        ("plain words", None, "plain words"),
        ("{'a': 1}", {"b": 2}, {"a": 1}),
        ("(flair, t1)", ("x",), ("flair", "t1")),
        ("[1, 2]", (0,), (1, 2)),
    ],
)
def test_parse_value(text, current, expected):
    out = parse_value(text, current)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("num_step=3", "did you mean: num_steps"),
        ("model.widht=3", "did you mean: model.width"),
        ("num_steps.x=3", "unknown config key 'num_steps.x'"),
        ("num_steps=three", "expected an int, got 'three'"),
        ("flag=maybe", "expected a bool"),
        ("lr=fast", "expected a float"),
        ("no_equals_sign", "expected 'KEY=VALUE'"),
    ],
)
def test_override_errors_name_the_key(item, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(_base(), [item])
    assert needle in str(e.value)


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        apply_overrides(_base(), ["zzzzzz=1"])
    assert str(e.value) == "unknown config key 'zzzzzz'"


def test_load_config_records_experiment_and_variant():
    c = load_config("toy", None, ["num_steps=7", "optimizer.learning_rate=0.5"], directory=TOY)
    assert (c.experiment, c.variant, c.num_steps) == ("toy", None, 7)
    assert c.optimizer.learning_rate == 0.5
    long = load_config("toy", "long", directory=TOY)
    assert (long.variant, long.num_steps) == ("long", 100)
    with pytest.raises(ConfigError, match="variant: expected one of quick, long"):
        load_config("toy", "huge", directory=TOY)


def test_config_json_round_trip_keeps_types():
    c = load_config("toy", "long", ["val_values=(1.0, 2.0)", "noise=0"], directory=TOY)
    text = config_to_json(c)
    saved = json.loads(text)
    assert saved["val_values"] == [1.0, 2.0] and saved["experiment"] == "toy"
    back = config_from_json(text, directory=TOY)
    assert back.val_values == (1.0, 2.0) and type(back.val_values) is tuple
    assert back.noise == 0.0 and type(back.noise) is float
    assert back.num_steps == 100 and back.variant == "long"
    assert back.to_dict() == c.to_dict()


def _write_experiment(root, name, config_body, task_body=None, extra=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.py").write_text(textwrap.dedent(config_body))
    if task_body is not None:
        (d / "task.py").write_text(textwrap.dedent(task_body))
    for fname, body in (extra or {}).items():
        (d / fname).write_text(textwrap.dedent(body))
    return d


def test_missing_required_field_is_an_error(tmp_path):
    _write_experiment(
        tmp_path,
        "bad",
        """
        import ml_collections
        def get_config(variant=None):
            return ml_collections.ConfigDict({"seed": 0, "num_steps": 1, "batch_size": 2})
        """,
    )
    with pytest.raises(ConfigError, match="missing required field.*checkpoint_every"):
        load_config("bad", directory=tmp_path)


def test_discovery_and_loading(tmp_path, monkeypatch):
    config = """
        '''Demo experiment.

        More text.'''
        import ml_collections
        VARIANTS = ("a",)
        def get_config(variant=None):
            return ml_collections.ConfigDict(
                {"seed": 1, "num_steps": 2, "batch_size": 2, "checkpoint_every": 1}
            )
        """
    task = """
        from medjax.train import Experiment as Base
        from .helper import VALUE
        class Experiment(Base):
            value = VALUE
        """
    _write_experiment(tmp_path, "demo", config, task, {"helper.py": "VALUE = 42\n"})
    _write_experiment(tmp_path, "other", config, task, {"helper.py": "VALUE = 7\n"})
    (tmp_path / "not_an_experiment").mkdir()
    monkeypatch.setenv("MEDJAX_EXPERIMENTS_DIR", str(tmp_path))
    assert find_experiments_dir() == tmp_path.resolve()
    assert list_experiments() == ["demo", "other"]
    spec = load_experiment("demo")
    assert spec.variants == ("a",) and spec.description == "Demo experiment."
    assert issubclass(spec.Experiment, Experiment)
    # sibling modules of two experiments with the same file names do not collide
    assert spec.Experiment.value == 42 and load_experiment("other").Experiment.value == 7
    c = load_config("demo", "a")
    assert (c.log_every, c.eval_every, c.keep_checkpoints) == (50, 0, 3)  # engine defaults
    with pytest.raises(ExperimentNotFoundError) as e:
        load_experiment("dmeo")
    assert "unknown experiment 'dmeo'" in str(e.value) and "available: demo, other" in str(e.value)


def test_default_experiments_dir_is_beside_the_package(monkeypatch):
    monkeypatch.delenv("MEDJAX_EXPERIMENTS_DIR", raising=False)
    import medjax

    expected = pathlib.Path(medjax.__file__).resolve().parents[1] / "experiments"
    assert find_experiments_dir() == expected


def test_experiment_implements():
    class A(Experiment):
        def validate(self, state):
            return {}

    assert A(None).implements("validate") and not A(None).implements("predict")


def test_lazy_engine_namespace_resolves_every_name():
    import medjax.train as mt

    for name in mt._LAZY:
        assert getattr(mt, name) is not None, name
    assert mt.fit.__module__ == "medjax.train.loop"
    assert mt.TrainState.__module__ == "medjax.train.state"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        mt.nothing_here  # noqa: B018
