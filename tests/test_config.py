from pathlib import Path

import pytest

from fedlowrank.config import ConfigError, RunConfig, parse_overrides

REPO = Path(__file__).resolve().parent.parent


def test_default_toml_spells_out_the_dataclass_defaults():
    from simulations.sync_defaults import default_config

    from_file = RunConfig.from_toml(REPO / "simulations" / "default.toml")
    assert from_file == default_config()  # RunConfig's defaults and every method's option defaults


def test_overrides_are_typed_and_dotted_keys_reach_sections(tmp_path):
    config = RunConfig.from_toml(
        REPO / "simulations" / "default.toml",
        [
            "num-rounds=7",
            "lora.r=4",
            "lora.target-modules=query,key",
            "train.lr=1e-3",
            "data.dirichlet-alpha=0.1",
            "strategy=fedit",
            "dp.delta=1e-6",
            "lora.use-rslora=true",
        ],
    )
    assert config.num_rounds == 7 and isinstance(config.num_rounds, int)
    assert config.lora.r == 4
    assert config.lora.target_modules == ["query", "key"]
    assert config.train.lr == pytest.approx(1e-3)
    assert config.data.dirichlet_alpha == pytest.approx(0.1)
    assert config.dp.delta == pytest.approx(1e-6)
    assert config.lora.use_rslora is True


def test_flat_round_trip_through_flower_run_config():
    config = RunConfig.from_flat(
        {
            "num-clients": 3,
            "lora.target-modules": ["query", "value", "key"],
            "data.label-proportions": [[0.9, 0.1], [0.1, 0.9]],
        }
    )
    flat = config.to_flat()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert RunConfig.from_flat(flat) == config


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("num-round=3", "Did you mean num-rounds"),
        ("lora.rank=3", "lora.r"),
        ("nosuchsection.x=1", "unknown config key"),
        ("lora=3", "unknown config key"),
        ("num-rounds=abc", "cannot use 'abc' as int"),
        ("num-rounds=0", "num-rounds must be >= 1"),
        ("data.partitioner=zipf", "data.partitioner must be one of"),
        ("lora.use-rslora=maybe", "cannot use 'maybe' as bool"),
        ("dp.epsilon=-1", "dp.epsilon must be >= 0"),
        ("dp.engine=ghostly", "dp.engine must be"),
        ("noequals", "KEY=VALUE"),
    ],
)
def test_bad_config_values_fail_with_clear_messages(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flat(parse_overrides([override]))


def test_missing_and_broken_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_toml(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        RunConfig.from_toml(broken)


def test_every_simulation_config_parses():
    from strategies.registry import resolve_method

    for path in sorted((REPO / "simulations").rglob("*.toml")):
        if path.name == "claims.toml":  # the reproduction report's list of paper claims, not a run
            continue
        resolve_method(RunConfig.from_toml(path))
