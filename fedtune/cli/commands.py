"""The ``fedtune`` command. Each subcommand is a thin shell over one module's entry point.

User errors (``UserError``, bad flags) print one ``fedtune: error: ...`` line per
problem and exit 2; Ctrl-C exits 130 after the launchers stopped what they started.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from fedtune.core.config import Config, load_config
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            allowed = re.findall(r"'?([\w-]+)'?", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), allowed, n=1)
            message += f"; did you mean '{close[0]}'?" if close else ""
        where = self.prog.removeprefix("fedtune").strip()
        raise UserError(f"{where}: {message}" if where else message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up live, also in log files
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops what we started, like Ctrl-C does
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedtune", description="Federated LoRA fine-tuning on Flower.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    simulate = commands.add_parser("simulate", help="run a federation of N local clients (Flower Simulation Engine)")
    _config_args(simulate)
    simulate.add_argument(
        "--app",
        default=None,
        metavar="DIR",
        help="advanced: a Flower App directory to run instead of fedtune's own (e.g. a custom ClientApp)",
    )
    simulate.set_defaults(handler=_simulate)

    train = commands.add_parser("train", help="centralized reference: the same trainer on all training data")
    _config_args(train)
    train.set_defaults(handler=_train)

    compare = commands.add_parser("compare", help="run several strategies on identical seeds and partitions")
    compare.add_argument("config", metavar="CONFIG", help="YAML config file")
    compare.add_argument(
        "--strategies", default="all", help="comma-separated strategy names, or all (every registered strategy; the default)"
    )
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    compare.add_argument("--out", required=True, metavar="DIR", help="comparison directory")
    compare.add_argument("--central", action="store_true", help="also run the centralized reference (fedtune train)")
    compare.set_defaults(handler=_compare)

    evaluate = commands.add_parser("evaluate", help="metrics of a run's global model on a labeled file (JSON)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", required=True, metavar="FILE", help="labeled .jsonl/.csv/.tsv file")
    evaluate.add_argument("--round", type=int, default=None, metavar="K", help="checkpoint round (default: last)")
    evaluate.add_argument("--client", default=None, metavar="NAME", help="personalised model of this client (FedSA)")
    evaluate.add_argument(
        "--quantization",
        choices=["none", "int8", "nf4", "fp4"],
        default=None,
        help="load the base this way instead of as trained (none: the full-precision base export merges into)",
    )
    evaluate.set_defaults(handler=_evaluate)
    coordinator = commands.add_parser("coordinator", help="run the federation's server for agents on other machines")
    coordinator.add_argument("config", metavar="CONFIG", nargs="?", help="YAML config (optional with --resume)")
    coordinator.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    coordinator.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT", help="where agents connect")
    coordinator.add_argument(
        "--out", default=None, metavar="DIR", help="run directory (default: output.dir/output.name)"
    )
    coordinator.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue after its last checkpoint")
    coordinator.add_argument("--certs", type=Path, default=None, metavar="DIR", help="ca.crt, server.crt, server.key")
    coordinator.add_argument(
        "--authorized-keys",
        type=Path,
        default=None,
        metavar="PATH",
        help="agents' public keys: a .pub file or a directory of them",
    )
    coordinator.add_argument("--insecure", action="store_true", help="plain text and no agent authentication")
    coordinator.set_defaults(handler=_coordinator)

    agent = commands.add_parser("client", help="run a client agent that trains on a local file")
    agent.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    agent.add_argument("--data", required=True, type=Path, metavar="FILE", help="this machine's private data")
    agent.add_argument(
        "--name",
        default=None,
        help="this agent's name: with --key it must be the name the coordinator registered the key under "
        "(default: the key file's name, else the data file's stem)",
    )
    agent.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    agent.add_argument(
        "--mode",
        choices=["backprop", "zo", "auto"],
        default=None,
        help="local training: backprop, zeroth-order (forward only), or auto by --memory-budget "
        "(default: the run's client.mode)",
    )
    agent.add_argument(
        "--rank",
        default=None,
        metavar="R",
        help="this agent's LoRA rank, at most the run's adapter.r, or auto: the largest power of two whose "
        "backprop step fits --memory-budget; for strategies with per-client ranks "
        "(README's strategy table) (default: adapter.r)",
    )
    agent.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory this agent may use, e.g. 4G or 800M, for --mode auto (default: what is available)",
    )
    agent.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="private state kept across restarts (default: ~/.fedtune/agents/NAME)",
    )
    agent.add_argument("--ca-cert", type=Path, default=None, metavar="FILE", help="the coordinator's ca.crt")
    agent.add_argument(
        "--key", type=Path, default=None, metavar="FILE", help="this agent's private key (fedtune keygen)"
    )
    agent.add_argument("--insecure", action="store_true", help="plain text, for try-outs")
    agent.add_argument(
        "--serve", action="store_true", help="keep serving later runs (default: exit 0 when the run ends)"
    )
    agent.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for training (default: all cores; use cores / agents when several share a machine)",
    )
    agent.set_defaults(handler=_client)

    certs = commands.add_parser("certs", help="make a development CA and server certificate")
    certs.add_argument("directory", type=Path, metavar="DIR")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="coordinator host name or IP agents use (repeatable; localhost is always included)",
    )
    certs.set_defaults(handler=_certs)

    keygen = commands.add_parser("keygen", help="make an agent key pair (FILE and FILE.pub)")
    keygen.add_argument("path", type=Path, metavar="FILE")
    keygen.set_defaults(handler=_keygen)

    partition = commands.add_parser("partition", help="write each simulated client's data to DIR/client-K.jsonl")
    _config_args(partition, out_help="directory for client-K.jsonl (default: partitions/); must not hold partitions yet")
    partition.set_defaults(handler=_partition)

    export = commands.add_parser("export", help="merge a run's adapter and export a verified ONNX bundle")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to create")
    export.add_argument("--round", type=int, default=None, metavar="K", help="checkpoint round (default: last)")
    export.add_argument(
        "--client", default=None, metavar="NAME", help="export this client's personalised model (FedSA)"
    )
    export.add_argument(
        "--clients",
        default=None,
        metavar="all|NAME,...",
        help="one base model plus an adapter per client (FedSA; fp32): pick one with edge --client",
    )
    export.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantization")
    export.add_argument(
        "--format",
        choices=["onnx", "gguf"],
        default="onnx",
        help="onnx: a bundle for fedtune's edge runtime; gguf: base.gguf + adapter.gguf for llama.cpp "
        "(causal LMs; checked weight by weight, so the --check-* and --tolerance options are for onnx)",
    )
    export.add_argument(
        "--check-data", default=None, metavar="FILE", help="labeled file for the checks (default: run's eval data)"
    )
    export.add_argument("--check-examples", type=int, default=500, metavar="N", help="examples used by the checks")
    export.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference| ONNX vs PyTorch (fp32)")
    export.add_argument(
        "--max-drop", type=float, default=1.0, help="classifier: max accuracy drop (points) when quantizing"
    )
    export.add_argument(
        "--min-agreement", type=float, default=0.9, help="causal LM: min next-token agreement when quantizing"
    )
    export.set_defaults(handler=_export)

    edge = commands.add_parser("edge", help="run an exported bundle with onnxruntime only")
    edge_commands = edge.add_subparsers(dest="edge_command", required=True, parser_class=_Parser)
    edge_run = edge_commands.add_parser("run", help="classify a text, or generate from a prompt")
    edge_run.add_argument("bundle", metavar="BUNDLE")
    edge_run.add_argument("--text", required=True)
    edge_run.add_argument("--max-new-tokens", type=int, default=32)
    edge_run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    edge_run.add_argument("--top-k", type=int, default=0)
    edge_run.add_argument("--seed", type=int, default=0)
    edge_run.add_argument(
        "--raw", action="store_true", help="causal LM: use the text as the prompt, without the template"
    )
    edge_run.add_argument("--client", default=None, metavar="NAME", help="adapter bundles: this client's adapter")
    edge_run.set_defaults(handler=_edge_run)
    edge_bench = edge_commands.add_parser("bench", help="accuracy / exact match and latency on a labeled file")
    edge_bench.add_argument("bundle", metavar="BUNDLE")
    edge_bench.add_argument("--data", required=True, metavar="FILE")
    edge_bench.add_argument("--limit", type=int, default=None, metavar="N", help="first N rows only")
    edge_bench.add_argument("--text-field", default=None, help="default: the run's data.text_field")
    edge_bench.add_argument("--label-field", default=None, help="default: the run's data.label_field")
    edge_bench.add_argument("--client", default=None, metavar="NAME", help="adapter bundles: this client's adapter")
    edge_bench.set_defaults(handler=_edge_bench)
    return parser


def _config_args(parser: argparse.ArgumentParser, out_help: str = "run directory (default: output.dir/output.name)") -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable), e.g. --set federation.rounds=5",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help=out_help)


def _prepare_run(
    args: argparse.Namespace, need_train_data: bool, check: Callable[[Config], None] | None = None
) -> tuple[Config, RunDir]:
    """The resolved config and a new run directory, created only once every check passed."""
    from fedtune.cli.resolve import resolve

    config = resolve(
        load_config(args.config, args.overrides), name_hint=Path(args.config).stem, need_train_data=need_train_data
    )
    if check:
        check(config)
    path = Path(args.out) if args.out else Path(config.output.dir) / str(config.output.name)
    if path.exists() and any(path.iterdir()):
        if RunDir(path).metrics_file.exists() or RunDir(path).checkpoints.exists() or not RunDir(path).config_file.exists():
            raise UserError(f"{path} already exists and is not empty; choose another --out or output.name")
        print(f"fedtune: {path} holds no round yet (an earlier start failed); starting there again")
    if args.out:
        if not re.fullmatch(r"[\w.-]+", path.name):
            raise UserError(f"--out {args.out}: name the run directory with letters, digits, '.', '_' or '-'")
        config.output.dir, config.output.name = str(path.resolve().parent), path.name
    return config, RunDir.create(path, config)


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.simulations.simulate import run_simulation

    config, run = _prepare_run(args, need_train_data=True)
    print(
        f"fedtune: simulating {config.federation.clients} clients x {config.federation.rounds} rounds "
        f"({config.strategy.name}, {config.model.name}) -> {run.path}"
    )
    summary = run_simulation(config, run, app_dir=Path(args.app).resolve()) if args.app else run_simulation(config, run)
    return _report(summary, run)


def _train(args: argparse.Namespace) -> int:
    from fedtune.simulations.central import check_central, run_central, steps_per_round

    config, run = _prepare_run(args, need_train_data=True, check=check_central)
    print(f"fedtune: centralized training, {config.federation.rounds} x {steps_per_round(config)} steps -> {run.path}")
    return _report(run_central(config, run), run)


def _report(summary: dict, run: RunDir) -> int:
    """Final line of a run command; a run that stopped before its last round exits 1
    (one that reached its privacy budget ended as configured: 0)."""
    print(json.dumps({k: summary[k] for k in ("final", "best", "wall_s") if k in summary}))
    if summary.get("status") == "budget-reached":
        print(f"fedtune: run ended at its privacy budget: {summary['reason']}")
    if summary.get("status") == "stopped":
        print(f"fedtune: run stopped: {summary.get('reason')} (continue with --resume {run.path})", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.cli.resolve import resolve
    from fedtune.simulations.compare import markdown_table, run_comparison
    from fedtune.strategies import STRATEGIES

    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    strategies = list(STRATEGIES) if strategies == ["all"] else strategies
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown or not strategies:
        raise UserError(f"--strategies: unknown {unknown}; allowed: {', '.join(STRATEGIES)}")
    loaded = load_config(args.config, args.overrides)
    ranks = loaded.client.ranks  # for the strategies that take them (run_comparison checks each)
    loaded.client.ranks = None
    config = resolve(loaded, name_hint="compare", need_train_data=True)
    config.client.ranks = ranks
    results = run_comparison(config, strategies, Path(args.out), args.central)
    print(markdown_table(results), end="")
    return 0 if all(r.get("status") == "completed" for r in results.values()) else 1


def _evaluate(args: argparse.Namespace) -> int:
    from fedtune.core.records import read_records
    from fedtune.engine.checkpoint import load_run_model
    from fedtune.engine.data import TaskSpec, encode
    from fedtune.engine.evaluate import evaluate

    run = RunDir.open(args.run_dir)
    progress = functools.partial(print, file=sys.stderr, flush=True)  # stdout holds the one JSON line
    progress(f"fedtune: loading {run.path.name}'s model")
    model, round_number = load_run_model(run, args.round, args.client, args.quantization)
    data = encode(read_records(args.data), TaskSpec.from_config(run.config()), model.tokenizer, args.data)
    progress(f"fedtune: evaluating round {round_number} on {len(data)} examples")
    metrics = evaluate(model, data)
    print(
        json.dumps(
            {
                "round": round_number,
                "client": args.client,
                "base_quantization": model.quantization,
                "data": args.data,
                "eval_accuracy": metrics["accuracy"],
                "eval_loss": metrics["loss"],
                "num_examples": metrics["num-examples"],
            }
        )
    )
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from fedtune.coordinator.service import CoordinatorSettings, run_coordinator

    settings = CoordinatorSettings(args.address, args.certs, args.authorized_keys, args.insecure)
    if args.resume:
        run = RunDir.open(args.resume)
        config = run.config()
        print(f"fedtune: resuming {run.path} with its config.yaml")
    elif args.config is None:
        raise UserError("coordinator: CONFIG is required unless --resume RUN_DIR is given")
    else:
        config, run = _prepare_run(args, need_train_data=False)
    return _report(run_coordinator(config, run, settings), run)


def _client(args: argparse.Namespace) -> int:
    from fedtune.client.agent import AgentSettings, run_agent

    name = args.name or (args.key.name if args.key else args.data.stem)
    state_dir = args.state_dir or Path.home() / ".fedtune" / "agents" / name
    if not args.insecure and args.key is None:
        raise UserError(
            "agent authentication is on by default: pass --key FILE (make one with fedtune keygen FILE "
            "and give FILE.pub to the coordinator), or --insecure"
        )
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    rank = _rank(args.rank) if args.rank is not None else None
    settings = AgentSettings(
        args.coordinator,
        args.data,
        name,
        args.device,
        state_dir,
        args.ca_cert,
        args.key,
        args.insecure,
        args.threads,
        mode=args.mode or "",
        memory_budget_mb=_megabytes(args.memory_budget) if args.memory_budget else 0.0,
        serve=args.serve,
        rank=rank,
    )
    return run_agent(settings)


def _rank(text: str) -> int | str:
    """``--rank``: a positive integer, or ``auto`` (chosen by the agent from its memory budget)."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"--rank {text}: use a positive integer (at most the run's adapter.r) or auto")
    return int(text)


def _megabytes(size: str) -> float:
    """``4G``, ``800M``, ``800`` (MB) -> megabytes."""
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}
    text = size.strip().upper().removesuffix("B") or "?"
    factor = units.get(text[-1], None)
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1.0)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"--memory-budget {size}: use a positive size such as 4G, 800M or 800 (MB)")
    return value


def _certs(args: argparse.Namespace) -> int:
    from fedtune.core.security import make_certs

    files = make_certs(args.directory, args.host)
    print(f"fedtune: wrote {', '.join(str(p) for p in files.values())} (+ ca.key: keep it private)")
    print("fedtune: the coordinator uses --certs DIR; each agent needs only ca.crt (--ca-cert)")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from fedtune.core.security import make_agent_key

    public = make_agent_key(args.path)
    print(f"fedtune: private key {args.path} (stays on the agent), public key {public} (give it to the coordinator)")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedtune.cli.resolve import resolve
    from fedtune.engine.partition import client_partition

    config = resolve(load_config(args.config, args.overrides), name_hint="partition", need_train_data=True)
    out = Path(args.out or "partitions")
    existing = sorted(out.glob("client-*.jsonl")) if out.is_dir() else []
    if existing:
        raise UserError(f"--out {out}: already holds {existing[0].name} and others; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    for index in range(config.federation.clients):
        rows = client_partition(config, index)
        target = out / f"client-{index}.jsonl"
        target.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{target}: {len(rows)} rows")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedtune.edge.export import export_bundle

    if args.round is not None and (args.client or args.clients is not None):
        last = RunDir.open(args.run_dir).completed_rounds()[-1:]
        if [args.round] != last:
            raise UserError(
                f"--round {args.round} with --client(s): clients keep their private tensors of the last round "
                f"only ({last[0] if last else 'none yet'}), so an older round would mix rounds; leave --round out"
            )

    if args.format == "gguf":
        if args.clients is not None or args.quantize != "none":
            raise UserError("--format gguf: not with --clients or --quantize (the base keeps its GGUF quantization)")
        from fedtune.edge.gguf_export import export_gguf

        export_gguf(RunDir.open(args.run_dir), Path(args.out), args.round, args.client)
        return 0
    if args.clients is not None:
        if args.client or args.quantize != "none":
            raise UserError("--clients: not with --client or --quantize (an adapter bundle is fp32 and holds every client)")
        from fedtune.edge.adapters import export_adapter_bundle
        from fedtune.edge.lm_adapters import export_lm_adapter_bundle

        run = RunDir.open(args.run_dir)
        names = None if args.clients == "all" else [n.strip() for n in args.clients.split(",") if n.strip()]
        export = export_lm_adapter_bundle if run.config().model.task == "causal-lm" else export_adapter_bundle
        export(run, Path(args.out), names, args.round, args.check_data, args.check_examples, args.tolerance)
        return 0
    export_bundle(
        RunDir.open(args.run_dir),
        Path(args.out),
        args.round,
        args.client,
        args.quantize,
        args.check_data,
        args.check_examples,
        args.tolerance,
        args.max_drop,
        args.min_agreement,
    )
    return 0


def _edge_run(args: argparse.Namespace) -> int:
    from fedtune.edge import Bundle

    bundle = Bundle.load(args.bundle)
    if args.client:
        bundle = bundle.with_client(args.client)
    if bundle.task == "classification":
        prediction = bundle.classify([args.text])[0]
        print(json.dumps({"label": prediction.label, "name": prediction.name, "probabilities": prediction.probabilities}))
    else:
        prompt = args.text if args.raw else bundle.prompt(args.text)
        text = bundle.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
        print(json.dumps({"prompt": prompt, "generated": text}))
    return 0


def _edge_bench(args: argparse.Namespace) -> int:
    from fedtune.core.records import read_records
    from fedtune.edge import Bundle, bench

    bundle = Bundle.load(args.bundle)
    if args.client:
        bundle = bundle.with_client(args.client)
    fields = bundle.manifest["fields"]
    rows = list(read_records(args.data))[: args.limit]
    result = bench(bundle, rows, args.text_field or fields["text"], args.label_field or fields["label"])
    print(json.dumps({"bundle": args.bundle, "data": args.data, **result}))
    return 0


def _quiet_libraries() -> None:
    """Library chatter (load reports, progress bars, bitsandbytes probes) stays off the terminal."""
    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("TQDM_DISABLE", "1"),  # flwr-datasets' partitioners; fedtune's own progress is its own lines
    ):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    for name in ("transformers", "bitsandbytes", "peft", "torch", "datasets", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
