"""The one YAML file that drives a fedtune run: schema, loading, ``--set`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo is an error
that names the field instead of a silently ignored setting. ``load_config`` turns any
problem into a ``UserError`` with one line per bad field.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.core.errors import UserError
from fedtune.core.model_catalog import describe_model_name
from fedtune.core.records import HF_PREFIX, SYNTHETIC_PREFIX


class YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so label words like yes/no/on/off stay strings."""


YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
OVERRIDES_VARIABLE = "FEDTUNE_SET"  # extra --set assignments for every config file read


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SectionT = TypeVar("SectionT", bound=Section)


class ModelSection(Section):
    name: str = "minilm-l6"
    task: Literal["classification", "causal-lm"] = "classification"
    max_length: int | None = Field(None, ge=8, le=32768)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["none", "int8", "nf4", "fp4"] = "none"

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        problem = describe_model_name(name)
        if problem:
            raise ValueError(problem)
        return name


class AdapterSection(Section):
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    rslora: bool = False


class StrategySection(Section):
    """``strategy``: which method, and the robust aggregation every method takes.

    ``name`` and a method's own section (``strategy.NAME``, e.g. ``strategy.fair``) are the
    registry's to check (strategies/__init__.py: each class declares its settings): unset,
    the name is the registry's default, filled in when the config is resolved.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # strategy.NAME: the method's section

    name: str | None = None
    robust: Literal["none", "norm-bound", "trimmed-mean", "median"] = "norm-bound"
    max_weight_ratio: float = Field(3.0, ge=1.0)
    norm_bound: float = Field(3.0, ge=1.0)
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)

    def section(self, name: str) -> dict[str, Any]:
        """The raw ``strategy.NAME`` section (empty when not given)."""
        value = (self.model_extra or {}).get(name, {})
        return value if isinstance(value, dict) else {}


class FederationSection(Section):
    clients: int = Field(10, ge=1, le=100_000)
    rounds: int = Field(10, ge=1, le=100_000)
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    min_clients: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0)
    round_retries: int = Field(3, ge=0)
    join_timeout: float = Field(30.0, ge=0)
    eval_every: int = Field(1, ge=0)
    compression: Literal["none", "fp16", "int8"] = "none"
    max_message_mb: float = Field(64.0, gt=0.0)
    secure_aggregation: Literal["none", "secagg+"] = "none"  # the coordinator learns only sums (core/secagg.py)
    secagg_threshold: int = Field(3, ge=3)  # the fewest clients whose sum may be revealed (always a majority too)
    secagg_clip: float | None = Field(None, gt=0.0)  # ±c per coordinate of a weighted change; None: from client.lr
    secagg_stage_timeout: float = Field(120.0, gt=0.0)  # each key and share exchange's deadline

    def clients_per_round(self) -> int:
        """Clients sampled per round when all are connected: ⌈fraction·clients⌉, at least min_clients."""
        return min(self.clients, max(self.min_clients, math.ceil(self.fraction * self.clients)))


class ClientSection(Section):
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    optimizer_state: Literal["fresh", "kept"] = "fresh"  # kept: AdamW's moments carry over between rounds
    weight_decay: float = Field(0.0, ge=0.0)
    grad_accum: int = Field(1, ge=1)
    max_physical_batch: int | None = Field(None, ge=1)  # a (logical) batch runs in chunks of at most this size
    sampling: Literal["shuffle", "poisson"] = "shuffle"
    mode: Literal["backprop", "zo", "auto"] = "backprop"
    zo_clients: list[int] | float | None = None
    zo_steps: int | None = Field(None, ge=1)
    zo_lr: float = Field(1e-4, gt=0.0, le=10.0)
    zo_schedule: Literal["constant", "linear", "cosine"] = "constant"
    zo_eps: float = Field(1e-3, gt=0.0)
    zo_samples: int = Field(1, ge=1, le=64)
    zo_upload: Literal["delta", "seeds"] = "delta"
    zo_head: Literal["probe", "random"] = "probe"  # ZO clients fit a shared head by a linear probe in round 1
    ranks: list[int] | None = Field(None, min_length=1)  # per-client LoRA ranks, cycled over simulated clients

    @field_validator("zo_clients")
    @classmethod
    def _zo_clients(cls, value: list[int] | float | None) -> list[int] | float | None:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("a fraction of clients must be between 0 and 1")
        if isinstance(value, list) and any(i < 0 for i in value):
            raise ValueError("client indices start at 0")
        return value

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(r < 1 for r in value):
            raise ValueError("ranks are at least 1")
        return value


class PartitionSection(Section):
    kind: Literal["iid", "dirichlet", "field"] = "iid"
    alpha: float = Field(0.5, gt=0.0)
    field: str | None = None
    min_size: int = Field(10, ge=1)


class DataSection(Section):
    train: str | None = None
    eval: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = None
    holdout: float = Field(0.1, ge=0.0, lt=1.0)
    server_holdout: float = Field(0.0, ge=0.0, lt=1.0)
    eval_max_examples: int | None = Field(None, ge=1)
    prompt: str = "{text}"
    response: str = "{label}"
    label_words: dict[str, str] | None = None
    partition: PartitionSection = PartitionSection()

    @field_validator("train", "eval")
    @classmethod
    def _source_exists(cls, source: str | None) -> str | None:
        if source is None or source.startswith(HF_PREFIX):
            return source
        if source.startswith(SYNTHETIC_PREFIX):
            from fedtune.core.synthetic import describe_synthetic

            problem = describe_synthetic(source[len(SYNTHETIC_PREFIX) :])
            if problem:
                raise ValueError(problem)
            return source
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(
                f"file not found: {source} (allowed: an existing {'/'.join(DATA_SUFFIXES)} "
                f"file, {SYNTHETIC_PREFIX}NAME, or {HF_PREFIX}NAME)"
            )
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"unsupported file type {path.suffix!r}; allowed: {', '.join(DATA_SUFFIXES)}")
        return str(path.resolve())

    @field_validator("labels", "label_words", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        """Labels are names: 0/1 in a YAML file mean the labels "0" and "1"."""
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str) -> str:
        if "{text}" not in prompt:
            raise ValueError("must contain the placeholder {text}")
        return prompt


class PrivacySection(Section):
    mode: Literal["none", "sample", "client"] = "none"
    noise_multiplier: float | None = Field(None, ge=0.0)
    target_epsilon: float | None = Field(None, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    clip_norm: float = Field(1.0, gt=0.0)
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, ge=0.0, le=1.0)
    clip_lr: float = Field(0.2, gt=0.0)
    clipped_count_stddev: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0)


class SimulationSection(Section):
    client_cpus: int | None = Field(None, ge=1)
    client_gpus: float | None = Field(None, ge=0.0)
    # An existing Ray cluster (``ray start --head`` prints it): HOST:PORT, or "auto" for the
    # cluster this machine belongs to. None: Flower starts a private Ray on this machine.
    ray_address: str | None = Field(None, pattern=r"^(auto|[\w.-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5})$")

    @model_validator(mode="after")
    def _cluster_needs_cores(self) -> SimulationSection:
        if self.ray_address is not None and self.client_cpus is None:
            raise ValueError(
                "with ray_address set client_cpus too (CPU cores per simulated client on the cluster's nodes; "
                "this machine's core count says nothing about them)"
            )
        return self


class OutputSection(Section):
    dir: str = "runs"
    name: str | None = Field(None, pattern=r"^[\w.-]+$")
    plots: bool = True

    @field_validator("name")
    @classmethod
    def _one_directory(cls, value: str | None) -> str | None:
        """An agent keeps its state in --state-dir/NAME/...: a name of dots would leave that directory."""
        if value is not None and set(value) == {"."}:
            raise ValueError("a run name must name a directory, not . or ..")
        return value


class Config(Section):
    seed: int = Field(0, ge=0)
    model: ModelSection = ModelSection()
    adapter: AdapterSection = AdapterSection()
    strategy: StrategySection = StrategySection()
    federation: FederationSection = FederationSection()
    client: ClientSection = ClientSection()
    data: DataSection = DataSection()
    privacy: PrivacySection = PrivacySection()
    simulation: SimulationSection = SimulationSection()
    output: OutputSection = OutputSection()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw config dict (value parsed as YAML)."""
    match = re.fullmatch(r"([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)", assignment, re.S)
    if not match:
        raise UserError(f"--set {assignment!r}: expected section.key=value, e.g. federation.rounds=5")
    path, text = match.group(1).split("."), match.group(2)
    value = _parse_override_value(path, text)
    node = raw
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _parse_override_value(path: list[str], text: str) -> Any:
    """YAML-typed value, except that string fields take the text as is (unless quoted)."""
    if _is_string_field(path) and not text.startswith(("'", '"')):
        return None if text in ("null", "~") else text
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _is_string_field(path: list[str]) -> bool:
    model: type[BaseModel] = Config
    for key in path:
        info = model.model_fields.get(key)
        if info is None:
            return False
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return annotation in (str, str | None)
    return False


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read, override and validate a config; any problem raises ``UserError``.

    ``FEDTUNE_SET`` (``;``-separated ``SECTION.KEY=VALUE``) overrides a config file before
    the command line's ``--set`` does: a way to shrink a documented command without
    editing it (the README's deployment test runs the README's commands that way).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(Path(path))
        if from_environment := environment_overrides():  # said, so that a forgotten export is noticed
            print(f"fedtune: {OVERRIDES_VARIABLE} overrides {path}: {'; '.join(from_environment)}", file=sys.stderr)
        for assignment in from_environment:
            try:
                apply_override(raw, assignment)
            except UserError as err:
                raise UserError(f"{OVERRIDES_VARIABLE}: {str(err).removeprefix('--set ')}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source=str(path) if path else "config")


def environment_overrides() -> list[str]:
    """The assignments in ``FEDTUNE_SET``, in order."""
    return [part.strip() for part in os.environ.get(OVERRIDES_VARIABLE, "").split(";") if part.strip()]


def parse_config_text(text: str, source: str = "run config") -> Config:
    """A config serialized with ``Config.to_yaml`` (what runs and clients receive)."""
    raw = load_yaml(text)
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a YAML mapping")
    return validate_config(raw, source=source)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, data:, ...) at the top level")
    return raw


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(source, e) for e in err.errors()]
        raise UserError("\n".join(lines)) from None


def validate_section(model: type[SectionT], raw: Any, where: str, source: str = "config") -> SectionT:
    """RAW as the section MODEL found at WHERE (``strategy.fair``), one ``UserError`` line per problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for error in err.errors():
            loc = [where, *map(str, error["loc"])]
            if error["type"] == "extra_forbidden":
                lines.append(f"{source}: {'.'.join(loc)}: unknown key; allowed keys here: {', '.join(model.model_fields)}")
            else:
                lines.append(_describe_error(source, {**error, "loc": loc}))
        raise UserError("\n".join(lines)) from None


def _describe_error(source: str, error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        return f"{source}: {field}: unknown key; allowed keys here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = (
        "" if isinstance(got, dict) or "file not found" in message or "unknown model" in message else f" (got {got!r})"
    )
    return f"{source}: {field}: {message}{shown}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for key in loc:
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
