"""The ``fedtune`` command. Each subcommand is a thin shell over one module's entry point.

User errors (``UserError``, bad flags) print one ``fedtune: error: ...`` line per
problem and exit 2; Ctrl-C exits 130 after the launchers stopped what they started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fedtune.config import Config, load_config
from fedtune.errors import UserError
from fedtune.rundir import RunDir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise UserError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _quiet_libraries()
        return args.handler(args) or 0
    except UserError as err:
        for line in str(err).splitlines() or ["unknown error"]:
            print(f"fedtune: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedtune", description="Federated LoRA fine-tuning on Flower.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    simulate = commands.add_parser("simulate", help="run a federation of N local clients (Flower Simulation Engine)")
    _config_args(simulate)
    simulate.add_argument("--app", default=None, metavar="DIR",
                          help="advanced: a Flower App directory to run instead of fedtune's own (e.g. a custom ClientApp)")
    simulate.set_defaults(handler=_simulate)

    train = commands.add_parser("train", help="centralized reference: the same trainer on all training data")
    _config_args(train)
    train.set_defaults(handler=_train)

    compare = commands.add_parser("compare", help="run several strategies on identical seeds and partitions")
    compare.add_argument("config", metavar="CONFIG", help="YAML config file")
    compare.add_argument("--strategies", default="fedit,ffa,fedsa,fair", help="comma-separated (default: all four)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    compare.add_argument("--out", required=True, metavar="DIR", help="comparison directory")
    compare.add_argument("--central", action="store_true", help="also run the centralized reference (fedtune train)")
    compare.set_defaults(handler=_compare)

    evaluate = commands.add_parser("evaluate", help="metrics of a run's global model on a labeled file (JSON)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", required=True, metavar="FILE", help="labeled .jsonl/.csv/.tsv file")
    evaluate.add_argument("--round", type=int, default=None, metavar="K", help="checkpoint round (default: last)")
    evaluate.add_argument("--client", default=None, metavar="NAME", help="personalised model of this client (FedSA)")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set federation.rounds=5")
    parser.add_argument("--out", default=None, metavar="DIR", help="run directory (default: output.dir/output.name)")


def _prepare_run(args: argparse.Namespace, need_train_data: bool) -> tuple[Config, RunDir]:
    from fedtune.resolve import resolve

    config = resolve(load_config(args.config, args.overrides), name_hint=Path(args.config).stem,
                     need_train_data=need_train_data)
    path = Path(args.out) if args.out else Path(config.output.dir) / str(config.output.name)
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path} already exists and is not empty; choose another --out or output.name")
    if args.out:
        config.output.dir, config.output.name = str(path.resolve().parent), path.name
    return config, RunDir.create(path, config)


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import run_simulation

    config, run = _prepare_run(args, need_train_data=True)
    print(f"fedtune: simulating {config.federation.clients} clients x {config.federation.rounds} rounds "
          f"({config.strategy.name}, {config.model.name}) -> {run.path}")
    summary = run_simulation(config, run, app_dir=Path(args.app).resolve()) if args.app else run_simulation(config, run)
    print(json.dumps({k: summary[k] for k in ("final", "best", "wall_s") if k in summary}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from simulations.central import run_central, steps_per_round

    config, run = _prepare_run(args, need_train_data=True)
    print(f"fedtune: centralized training, {config.federation.rounds} x {steps_per_round(config)} steps -> {run.path}")
    summary = run_central(config, run)
    print(json.dumps({k: summary[k] for k in ("final", "best", "wall_s") if k in summary}))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.resolve import resolve
    from simulations.compare import markdown_table, run_comparison
    from strategies import STRATEGIES

    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown or not strategies:
        raise UserError(f"--strategies: unknown {unknown}; allowed: {', '.join(STRATEGIES)}")
    config = resolve(load_config(args.config, args.overrides), name_hint="compare", need_train_data=True)
    results = run_comparison(config, strategies, Path(args.out), args.central)
    print(markdown_table(results), end="")
    return 0 if all(r.get("status") == "completed" for r in results.values()) else 1


def _evaluate(args: argparse.Namespace) -> int:
    from client.data import TaskSpec, encode, read_records
    from client.evaluate import evaluate
    from coordinator.checkpoint import load_run_model

    run = RunDir.open(args.run_dir)
    model, round_number = load_run_model(run, args.round, args.client)
    data = encode(read_records(args.data), TaskSpec.from_config(run.config()), model.tokenizer, args.data)
    metrics = evaluate(model, data)
    print(json.dumps({"round": round_number, "client": args.client, "data": args.data,
                      "eval_accuracy": metrics["accuracy"], "eval_loss": metrics["loss"],
                      "num_examples": metrics["num-examples"]}))
    return 0


def _quiet_libraries() -> None:
    """Library chatter (load reports, progress bars, bitsandbytes probes) stays off the terminal."""
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in ("transformers", "bitsandbytes", "peft", "torch", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
