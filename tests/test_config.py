"""Config loading: bad input is one line naming the field, exit 2, no traceback."""

from __future__ import annotations

import pytest
import yaml

from conftest import run_cli
from fedtune.core.config import Config, load_config, parse_config_text
from fedtune.core.errors import UserError

GOOD = {
    "model": {"name": "minilm-l6"},
    "federation": {"clients": 3, "rounds": 1, "min_clients": 2},
    "data": {"train": "synthetic:support/train", "partition": {"kind": "iid"}},
}


def _write(tmp_path, raw) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"federation": {"clientz": 3}}, "federation.clientz", "allowed keys here: clients, rounds"),
        ({"federation": {"rounds": "many"}}, "federation.rounds", "valid integer"),
        ({"client": {"lr": -0.1}}, "client.lr", "greater than 0"),
        ({"data": {"train": "/no/such/train.tsv"}}, "data.train", "file not found"),
        ({"model": {"name": "gpt-17"}}, "model.name", "minilm-l6, smollm2-135m"),
        ({"strategy": {"name": "fedfancy"}}, "strategy.name", "allowed: fedit, ffa, fedsa, fair"),
        ({"strategy": {"fair": {"max_stepz": 5}}}, "strategy.fair.max_stepz", "allowed keys here: regularization, max_steps"),
        ({"strategy": {"fancy": 1}}, "strategy.fancy", "allowed keys here: name, robust"),
        ({"data": {"partition": {"kind": "zipf"}}}, "data.partition.kind", "'iid', 'dirichlet' or 'field'"),
        ({"output": {"name": ".."}}, "output.name", "not . or .."),  # an agent's state dir is --state-dir/NAME
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, change, field, hint):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    result = run_cli("simulate", _write(tmp_path, raw), "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert field in lines[0] and hint in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_bad_cli_flag_and_bad_override_are_one_line(tmp_path):
    path = _write(tmp_path, GOOD)
    for args in (
        ["simulate", path, "--bogus"],
        ["simulate", path, "--set", "federation.rounds"],
        ["simulate", path, "--set", "federation.rounds=0"],
        ["simulate", str(tmp_path / "missing.yaml")],
    ):
        result = run_cli(*args, timeout=120)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: minilm-l6\n federation: [\n")
    with pytest.raises(UserError, match=r"broken.yaml: line \d+ is not valid YAML"):
        load_config(path)


def test_overrides_are_typed_by_the_schema(tmp_path):
    config = load_config(
        _write(tmp_path, GOOD),
        [
            "federation.rounds=7",
            "client.lr=3e-4",
            "adapter.target_modules=[query, key]",
            "data.response= {label}",
            "data.label_words={a: yes, b: no}",
            "model.max_length=null",
        ],
    )
    assert config.federation.rounds == 7 and config.client.lr == pytest.approx(3e-4)
    assert config.adapter.target_modules == ["query", "key"]
    assert config.data.response == " {label}"  # a string field keeps braces and spaces
    assert config.data.label_words == {"a": "yes", "b": "no"}
    assert config.model.max_length is None


def test_every_error_is_reported_not_just_the_first(tmp_path):
    raw = {**GOOD, "federation": {"clients": 0, "rounds": 0}}
    with pytest.raises(UserError) as info:
        load_config(_write(tmp_path, raw))
    lines = str(info.value).splitlines()
    assert any("federation.clients" in line for line in lines) and any("federation.rounds" in line for line in lines)


def test_resolved_config_round_trips_through_yaml():
    config = Config.model_validate(GOOD)
    assert parse_config_text(config.to_yaml()) == config


def test_shipped_configs_are_valid():
    from conftest import REPO

    for path in sorted((REPO / "simulations" / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        raw.get("data", {}).pop("train", None)  # data paths are checked where the data exists
        raw.get("data", {}).pop("eval", None)
        Config.model_validate(raw)


def test_readme_documents_every_config_key():
    from pydantic import BaseModel

    from conftest import REPO

    readme = (REPO / "README.md").read_text()

    def keys(model: type[BaseModel], prefix: str = ""):
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [key for key in keys(Config) if f"`{key}`" not in readme]
    assert not missing, f"README lacks config keys: {missing}"


def test_fedtune_set_shrinks_a_config_file_before_the_command_line(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 24\nclient:\n  local_steps: 4\n")
    monkeypatch.setenv("FEDTUNE_SET", "federation.rounds=2; client.local_steps=1")
    config = load_config(path, ["client.local_steps=3"])
    assert (config.federation.rounds, config.client.local_steps) == (2, 3)  # --set wins over the environment
    monkeypatch.setenv("FEDTUNE_SET", "federation.rounds")
    with pytest.raises(UserError, match=r"^FEDTUNE_SET: 'federation.rounds': expected section.key=value"):
        load_config(path)


def test_a_strategy_owns_its_section_and_older_flat_keys_are_still_read(tmp_path):
    from fedtune.strategies import STRATEGIES, strategy_class, with_defaults

    # a config (or a run directory's config.yaml) from before the per-strategy sections
    path = _write(tmp_path, {"strategy": {"name": "fair", "fair_lambda": 0.1, "fair_steps": 7, "head": "private"}})
    config = load_config(path)
    fair = STRATEGIES["fair"].settings_of(config)
    assert (fair.regularization, fair.max_steps) == (0.1, 7)
    assert STRATEGIES["fedsa"].settings_of(config).head == "private"
    with_defaults(config)  # as the resolved config records it
    assert "fair_lambda" not in config.to_yaml() and config.strategy.section("fair") == {"regularization": 0.1, "max_steps": 7}
    path = _write(tmp_path, {"strategy": {"name": "fair"}})
    config = load_config(path, ["strategy.fair.regularization=0.1", "strategy.fedsa.head=private"])
    assert STRATEGIES["fair"].settings_of(config).regularization == 0.1
    assert STRATEGIES["fedsa"].settings_of(config).head == "private"
    assert strategy_class(load_config(_write(tmp_path, {}))) is next(iter(STRATEGIES.values()))  # the default
