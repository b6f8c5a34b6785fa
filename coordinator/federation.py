"""The coordinator's round loop, readable top to bottom.

Each round: the strategy samples clients and builds messages, Flower's Grid delivers
them and collects replies, the strategy checks and combines the replies, clients and
server evaluate (at the same time), then the round is recorded (metrics line,
checkpoint, progress line). A run directory that already has checkpoints resumes after
its last completed round.
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.coordinator.dp_preflight import privacy_warnings
from fedtune.coordinator.identity import NodeNames
from fedtune.coordinator.replies import ReplyBudget, collect, send, send_and_collect
from fedtune.coordinator.report import say
from fedtune.coordinator.secure_round import SecureRound
from fedtune.coordinator.session import Session
from fedtune.core.config import Config
from fedtune.core.dp_accounting import json_epsilon
from fedtune.core.rundir import RunDir
from fedtune.core.wire import RUN_FINISHED
from fedtune.engine.adapters import AdapterModel, build_adapter_model
from fedtune.engine.checkpoint import load_checkpoint
from fedtune.engine.data import ExampleSet
from fedtune.engine.evaluate import eval_set, evaluate
from fedtune.engine.rounds import RoundBook, finish_run
from fedtune.strategies import ClientLevelDP, LoraStrategy, build_strategy
from fedtune.strategies.secure import summary as secure_summary

END_NOTICE_SECONDS = 10.0  # how long the end-of-run notice waits for agents' acknowledgements
EVAL_GRACE_SECONDS = 30.0  # evaluation's wait for the agents that trained, when training used the round's deadline


@dataclass
class RoundRunner:
    config: Config
    run: RunDir
    strategy: LoraStrategy | ClientLevelDP
    session: Session
    model: AdapterModel  # the server's copy: evaluation and checkpoints
    eval_data: ExampleSet | None
    arrays: ArrayRecord
    first_round: int = 1
    elapsed_before: float = 0.0  # a resumed run's time before this process
    client_loads: dict[str, int] = field(default_factory=dict)  # process -> base-model loads
    client_epsilon: dict[str, float] = field(default_factory=dict)  # sample-level DP: name -> ε spent
    _grid: Grid | None = None

    @classmethod
    def prepare(
        cls,
        config: Config,
        run: RunDir,
        registered: Callable[[], dict[int, str]] | None = None,
        *,
        simulated: bool = False,
    ) -> RoundRunner:
        """The round runner of RUN; REGISTERED looks up agents' registered names (authenticated agents)."""
        say(f"loading {config.model.name} for the server's evaluation and checkpoints")
        model = build_adapter_model(config, list(config.data.labels or []))
        strategy = build_strategy(config)
        session = Session(strategy, NodeNames(registered), budget_replies=config.privacy.mode == "sample")
        for warning in privacy_warnings(config, strategy, model, simulated):
            say(f"WARNING: {warning}")
        if config.federation.secure_aggregation != "none":
            say(secure_summary(config))
        federation = cls(config, run, strategy, session, model, eval_set(config, model), ArrayRecord(model.state()))
        rounds = run.completed_rounds()
        if rounds:
            tensors, state = load_checkpoint(run.checkpoint(rounds[-1]))
            strategy.load_state_dict(state["strategy"])
            run.truncate_metrics(rounds[-1])
            federation.arrays = ArrayRecord(tensors)
            federation.first_round = rounds[-1] + 1
            federation.elapsed_before = state.get("elapsed_s", 0.0)
            federation.client_loads = state.get("client_loads") or run.read_private("client-loads.json")
            federation.client_epsilon = state.get("client_epsilon", {})
            session.retired = set(state.get("budget_spent", []))  # clients that stopped for budget
            say(f"resuming {run.path.name} after round {rounds[-1]}")
        return federation

    def run_rounds(self, grid: Grid) -> dict[str, Any]:
        self._grid = grid
        fed = self.config.federation
        self._wait_for_clients(grid)
        self._wait_for_latecomers(grid)
        book = RoundBook(self.config, self.run, say, self.elapsed_before)
        for rnd in range(self.first_round, fed.rounds + 1):
            round_start = time.time()
            if reason := self.strategy.refusal():
                return self._finish(book.elapsed(), stopped=f"before round {rnd}: {reason}", budget=True)
            train_metrics, traffic, deadline = self._train_round(grid, rnd)
            if train_metrics is None and fed.secure_aggregation != "none" and self._clients_with_budget() >= fed.min_clients:
                say(f"round {rnd}: skipped (secure aggregation failed in every attempt); the global adapter is unchanged")
                continue
            if train_metrics is None:
                budget = self._clients_with_budget() < fed.min_clients
                return self._finish(book.elapsed(), stopped=self._why_no_round(rnd), budget=budget)
            record = self._record(rnd, train_metrics, traffic)
            if book.evaluates(rnd):
                record.update(self._evaluate(grid, rnd, deadline))
            book.close_round(record, round_start, self.model, self.arrays.to_torch_state_dict(), self._state())
        return self._finish(book.elapsed())

    def _record(self, rnd: int, train_metrics: dict, traffic: dict[str, Any]) -> dict[str, Any]:
        """The round's metrics line (before evaluation): clients, traffic, rejections, bounds, privacy."""
        ledger = self.session.ledger
        for update in ledger.updates:
            self.client_loads[str(update.info.get("process", update.name))] = int(update.info.get("model-loads", 0))
        record: dict[str, Any] = {
            "round": rnd,
            "train_loss": train_metrics.get("train_loss"),  # DP-SGD clients do not report it
            "clients": len(ledger.updates),
            "sampled": ledger.sent_to,
            **traffic,
        }
        zo_clients = sum(update.info.get("mode") == "zo" for update in ledger.updates)
        if zo_clients:
            record["zo_clients"] = zo_clients
        if ledger.rejected:
            record["rejected"] = ledger.rejected
        shown = ("robust_clipped", "robust_capped", "secagg_dropped", "secagg_clipped", "secagg_s")
        record |= {key: ledger.stats[key] for key in shown if ledger.stats.get(key)}
        return record | self._privacy_metrics()

    def _state(self) -> dict[str, Any]:
        """What a resumed run needs besides the adapter (who took part stays private under client-level DP)."""
        state = {
            "strategy": self.strategy.state_dict(),
            "client_epsilon": self.client_epsilon,
            "budget_spent": sorted(self.session.retired),
        }
        if self._participation_is_private():  # who took part, and how often, is the operator's alone
            self.run.write_private("client-loads.json", self.client_loads)
        else:
            state["client_loads"] = self.client_loads
        return state

    def _train_round(self, grid: Grid, rnd: int) -> tuple[dict | None, dict[str, int], float]:
        """Train, aggregate; retry when too few usable replies come back. (metrics or None, bytes and the
        server's aggregation time: checking and decoding the replies plus the strategy's math, the deadline
        of the attempt that counted: evaluation shares it)."""
        fed = self.config.federation
        traffic = {"bytes_up": 0, "bytes_down": 0}
        self.session.suspended = set()
        for attempt in range(fed.round_retries + 1):
            self._wait_for_clients(grid)
            deadline = time.time() + fed.round_timeout
            messages = self.strategy.configure_train(rnd, self.arrays, ConfigRecord(), self.session.trainers(grid))
            if rnd == self.first_round and attempt == 0:  # clients load the model first: the longest round
                say(f"sending round {rnd} to {len(messages)} clients; they load the model, then train")
            if fed.secure_aggregation != "none":
                new_arrays, train_metrics, spent = self._secure_attempt(grid, rnd, messages, deadline)
            else:
                new_arrays, train_metrics, spent = self._plain_attempt(grid, rnd, messages, deadline)
            traffic["aggregate_s"] = round(traffic.get("aggregate_s", 0.0) + spent, 4)
            traffic["bytes_up"] += self.session.ledger.bytes_up
            traffic["bytes_down"] += self.session.ledger.bytes_down
            self._note_epsilons()
            if new_arrays is not None:
                self.arrays = new_arrays
                return dict(train_metrics), traffic, deadline
            if self._clients_with_budget() < fed.min_clients:
                return None, traffic, deadline
            rejected = self.session.ledger.rejected
            secure = [reason for reason in rejected if reason.startswith("secure aggregation:")]
            why = secure[0] if secure else f"{len(self.session.ledger.updates)} usable replies < min_clients {fed.min_clients}"
            others = [reason for reason in rejected if reason not in secure][:3]
            say(f"round {rnd}: {why} (attempt {attempt + 1}/{fed.round_retries + 1}); " + "; ".join(others))
        return None, traffic, time.time()

    def _plain_attempt(self, grid: Grid, rnd: int, messages: list[Message], deadline: float) -> tuple[ArrayRecord | None, Any, float]:
        """Send, collect, aggregate; (new arrays or None, metrics, the server's seconds: checking, decoding, math)."""
        self.session.start_round(messages)
        budget = ReplyBudget(self.strategy.max_reply_bytes(MessageType.TRAIN))
        timer = _Timed(self.session.receive_train)  # replies are checked and decoded as they arrive
        self.session.ledger.silent = collect(grid, send(grid, messages, deadline), deadline, budget, timer)
        started = time.perf_counter()
        new_arrays, train_metrics = self.session.aggregate(rnd)
        return new_arrays, train_metrics, timer.seconds + time.perf_counter() - started

    def _secure_attempt(self, grid: Grid, rnd: int, messages: list[Message], deadline: float) -> tuple[ArrayRecord | None, Any, float]:
        """The four exchanges of secure aggregation (coordinator/secure_round.py) in place of send and collect."""
        assert isinstance(self.strategy, LoraStrategy)  # client-level DP with secure aggregation is refused at load
        secure = SecureRound(grid, self.session, self.strategy, self.config, rnd)
        outcome = secure.run(messages, deadline)
        self.session.suspended |= secure.suspects
        new_arrays, train_metrics = self.session.settle(outcome)
        return new_arrays, train_metrics, secure.server_seconds

    def _note_epsilons(self) -> None:
        """Sample-level DP: remember every client's latest ε and who has stopped for budget."""
        ledger = self.session.ledger
        for update in ledger.updates:
            if "epsilon" in update.metrics:
                self.client_epsilon[update.name] = update.metrics["epsilon"]
        for name, epsilon in ledger.budget_spent.items():
            self.client_epsilon[name] = epsilon
            self.session.retired.add(name)  # not sampled to train again

    def _clients_with_budget(self) -> int:
        return self.config.federation.clients - len(self.session.retired)

    def _why_no_round(self, rnd: int) -> str:
        fed = self.config.federation
        if self._clients_with_budget() < fed.min_clients:
            said = [reason for reason in self.session.ledger.rejected if "privacy budget" in reason]
            return (
                f"round {rnd}: {len(self.session.retired)} of {fed.clients} clients have spent their privacy budget, "
                f"fewer than federation.min_clients={fed.min_clients} can still train ({said[0] if said else ''})"
            )
        return (
            f"round {rnd} got fewer than federation.min_clients={fed.min_clients} usable replies "
            f"in {fed.round_retries + 1} attempts"
        )

    def _privacy_metrics(self) -> dict[str, Any]:
        """ε so far (the max over clients in sample-level mode) and the mechanism's settings."""
        privacy = self.config.privacy
        if privacy.mode == "client":
            stats, released = self.session.ledger.stats, self.strategy.privacy_metrics()
            return {
                "epsilon": json_epsilon(released["epsilon"]),
                "delta": privacy.delta,
                "noise_multiplier": released["noise_multiplier"],
                "clip_norm": stats["clip_norm"],
                "clipped": sum(norm > stats["clip_norm"] for norm in stats["update_norms"]),
                "update_norm_median": round(statistics.median(stats["update_norms"]), 6),
            }
        if privacy.mode == "sample":
            epsilons = self.client_epsilon.values()
            return {
                "epsilon": json_epsilon(max(epsilons)) if epsilons else 0.0,
                "delta": privacy.delta,
                "client_epsilon": {name: json_epsilon(e) for name, e in sorted(self.client_epsilon.items())},
            }
        return {}

    def _evaluate(self, grid: Grid, rnd: int, deadline: float) -> dict[str, float]:
        """Clients and server evaluate the new global adapter at the same time, within the round's DEADLINE
        (agents silent in training are not asked; when training used the deadline up, the agents that
        trained get EVAL_GRACE_SECONDS), so one silent agent holds a round once, not twice."""
        result: dict[str, float] = {}
        grace = min(EVAL_GRACE_SECONDS, self.config.federation.round_timeout)
        deadline = max(deadline, time.time() + grace)
        messages = self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord(), self.session.evaluators(grid))
        sent = send(grid, messages, deadline)
        if self.eval_data is not None:
            self.model.load_state(self.arrays.to_torch_state_dict())
            metrics = evaluate(self.model, self.eval_data)
            result["eval_accuracy"] = metrics["accuracy"]
            result["eval_loss"] = metrics["loss"]
        replies: list[Message] = []
        collect(grid, sent, deadline, ReplyBudget(self.strategy.max_reply_bytes(MessageType.EVALUATE)), replies.append)
        client_metrics = self.session.evaluation(rnd, replies)
        if client_metrics:
            result["client_accuracy"] = client_metrics["accuracy"]
            result["client_loss"] = client_metrics["loss"]
        return result

    def _wait_for_clients(self, grid: Grid) -> None:
        needed = self.config.federation.min_clients
        announced = -1
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if connected != announced:
                say(f"waiting for clients: {connected}/{needed} connected")
                announced = connected
            time.sleep(1.0)

    def _wait_for_latecomers(self, grid: Grid) -> None:
        """Give agents launched a moment later the chance to be in the first round."""
        fed = self.config.federation
        deadline = time.time() + fed.join_timeout
        connected = len(list(grid.get_node_ids()))
        if connected < fed.clients and fed.join_timeout > 0:
            say(f"{connected}/{fed.clients} clients connected; waiting up to {fed.join_timeout:g} s for the rest")
        while connected < fed.clients and time.time() < deadline:
            time.sleep(0.5)
            connected = len(list(grid.get_node_ids()))

    def _finish(self, wall_s: float, stopped: str | None = None, budget: bool = False) -> dict[str, Any]:
        """Summary and final line; a run that hit its privacy budget ended as planned, not stopped."""
        loads = {
            "client_processes": len(self.client_loads),
            "client_base_model_loads": sum(self.client_loads.values()),
        }
        extra = {}
        if self._participation_is_private():
            self.run.write_private("summary.json", loads)
        else:
            extra |= loads
        if stopped:
            extra |= {"status": "budget-reached" if budget else "stopped", "reason": stopped}
        summary = finish_run(self.run, self.config, self.config.strategy.name, wall_s, extra)
        self._announce_end(summary)
        say(f"stopped: {stopped}" if stopped else f"done: {self.run.path}")
        return summary

    def _announce_end(self, summary: dict[str, Any]) -> None:
        """Tell the connected agents the run is over (they exit unless serving), with its public result."""
        if self._grid is None:
            return
        final = summary.get("final", {})
        notice = {"event": RUN_FINISHED, "status": summary.get("status", "completed"), "nonce": secrets.token_hex(16)}
        notice |= {k: float(final[k]) for k in ("eval_accuracy", "eval_loss") if final.get(k) is not None}
        messages = [
            Message(RecordDict({"config": ConfigRecord(notice)}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in self._grid.get_node_ids()
        ]
        send_and_collect(self._grid, messages, timeout=END_NOTICE_SECONDS)

    def _participation_is_private(self) -> bool:
        """Under client-level DP, how many clients took part (and which were new) is not released."""
        return self.config.privacy.mode == "client"


class _Timed:
    """A reply handler that adds up the seconds it spends (the coordinator's share of a round)."""

    def __init__(self, handler: Callable[[Message], None]) -> None:
        self.handler, self.seconds = handler, 0.0

    def __call__(self, reply: Message) -> None:
        started = time.perf_counter()
        self.handler(reply)
        self.seconds += time.perf_counter() - started
