"""A long-lived ClientApp process for a SuperNode in ``--isolation process`` mode.

With Flower's default subprocess isolation every train/evaluate message starts a fresh
``flwr-clientapp`` process that re-imports torch/transformers/peft (~10 s) and reloads
the base model. Here one process does what Flower's SuperExec does (acquire the next
ClientApp task from the SuperNode's Runtime API) but executes the task itself, in
process, as ``flwr-clientapp`` would: pull the message, run the ClientApp, push the
reply and the task status. The ClientApp module is imported once, so fedtune's
process-level caches keep the base model loaded across rounds and runs.

Only fedtune's own app runs here. A task whose FAB is not fedtune's code-free app
(core/app.py) is refused with one line and an error reply; for fedtune's app, the
installed ``client.client_app`` runs. Nothing from a FAB is ever installed or imported,
so a coordinator (or anyone who can submit a run to it) cannot run code on an agent.

This follows flwr 1.41's ``supernode/runtime/run_clientapp.py`` and
``supercore/superexec/run_superexec.py``, minus their process exit handling.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from logging import ERROR, WARNING

from flwr.app import Error, Message, MessageType

from fedtune.core import faults
from fedtune.core.app import app_fab_hash
from fedtune.core.errors import UserError
from fedtune.core.flower_internals import (
    AcquireTaskRequest,
    ErrorCode,
    HeartbeatSender,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    TaskType,
    log,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    pull_task_input,
    push_message,
    push_task_output,
    task_request_signer,
)
from fedtune.core.wire import RUN_FINISHED, payload_bytes

POLL_SECONDS = 0.2
LAST_REPLY_WAIT_SECONDS = 60.0  # an agent leaving the run waits this long for its reply to go out
# ... and then stays online this long, so the coordinator pulls the reply before the node is
# marked offline (a node that left first got "no reply (offline)" instead, seen in CI)
LEAVING_LINGER_SECONDS = 10.0
TASK_RETRY_SECONDS = 60.0  # give up on a vanished SuperNode instead of retrying forever
RUN_STATUSES = ("completed", "stopped", "budget-reached")  # summary.json's; anything else is not printed


class Deliveries:
    """How many replies the SuperNode has sent on (or given up on): one log line each.

    An agent that leaves the run waits for its last reply to go out first: the executor
    only hands a reply to the local SuperNode, which sends it on its own schedule, one
    message at a time, and logs exactly one such line per reply.
    """

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def count_one(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float, stop: threading.Event) -> bool:
        """Until COUNT replies are out, STOP is set (the SuperNode is gone) or TIMEOUT passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count < count and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            return self._count >= count


def serve_clientapps(
    runtime_address: str,
    stop: threading.Event,
    say: Callable[[str], None] = print,
    serve: bool = False,
    replies: Deliveries | None = None,
    secret: bytes | None = None,
) -> None:
    """Execute every ClientApp task the local SuperNode hands out, until ``stop`` is set or,
    unless SERVE, the coordinator says the run is over. REPLIES counts the replies the
    SuperNode has sent on, so that an agent that must leave does so after its reply. SECRET
    signs the requests for tasks (the SuperNode's ``--superexec-auth-secret-file``): another
    local user who reaches the SuperNode's loopback port cannot take this agent's tasks."""
    single_try = make_simple_http_retry_invoker()
    single_try.max_tries = 1  # failures come back to this loop, where `stop` is checked
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flower-superexec")]
    if secret:
        interceptors.append(task_request_signer(secret))
    dispatcher = _client(runtime_address, single_try, *interceptors)
    handed_over = 0  # replies given to the SuperNode
    try:
        while not stop.is_set():
            try:
                response = dispatcher.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
                )
            except Exception:  # the SuperNode restarts or is going away: the watcher decides
                stop.wait(1.0)
                continue
            if response.HasField("task") and response.token:
                problem, finished, handed = run_task(runtime_address, response.token, say)
                handed_over += handed
                leaving = problem or (finished and not serve)
                if leaving and replies:  # a reply half-sent when the SuperNode stops holds the coordinator up
                    replies.wait_for(handed_over, LAST_REPLY_WAIT_SECONDS, stop)
                if problem:  # this agent cannot take part: its reply said so, now it leaves
                    stop.wait(LEAVING_LINGER_SECONDS)
                    raise UserError(problem)
                if leaving:
                    return
            else:
                stop.wait(POLL_SECONDS)
    finally:
        dispatcher.close()


def run_task(runtime_address: str, token: str, say: Callable[[str], None] = print) -> tuple[str | None, bool, bool]:
    """One ClientApp execution (a train, evaluate or end-of-run message) of fedtune's app, in this process.

    Error replies carry a code from ``fedtune.core.faults`` and no text: exception messages
    may quote the private data. Returns (the local reason when the agent cannot take
    part in the run at all, e.g. its data does not fit it; whether the run is over;
    whether a reply was handed to the SuperNode).
    """
    patient = make_simple_http_retry_invoker()
    patient.max_time = TASK_RETRY_SECONDS
    client = _client(
        runtime_address,
        patient,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = problem = None
    finished = handed = False
    status, details = SubStatus.FAILED, "ClientApp failed"
    code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    try:
        message, context, run, fab = pull_task_input(client)
        if hashlib.sha256(fab.content).hexdigest() != app_fab_hash():
            code = faults.FOREIGN_APP
            say(f"fedtune: refused run {run.run_id}: its app is not fedtune's own ({_printable(run.fab_id)}); nothing of it ran")
        else:
            from fedtune.client.client_app import app  # the installed fedtune, never code from the FAB

            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            line, finished = describe_task(message, reply)
            say(line)
    except UserError as err:  # the data (or --mode) does not fit this run: it never will
        code, problem = faults.DATA_MISMATCH, str(err)
    except Exception as ex:  # the coordinator learns that training failed, not why; the agent keeps serving
        log(ERROR, "ClientApp raised an exception: %s", ex, exc_info=ex)
    finally:
        if reply is None and message is not None:
            details = faults.describe(code)
            reply = Message(Error(code=code, reason=details), reply_to=message)
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                handed = True
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as ex:  # e.g. the coordinator restarted mid-round: that run's reply is moot
            log(WARNING, "could not deliver the reply (%s); waiting for the next task", ex)
        finally:
            heartbeat.stop()
            client.close()
    return problem, finished, handed


def describe_task(message: Message, reply: Message) -> tuple[str, bool]:
    """One line for the agent's terminal about a finished task, and whether it ended the run."""
    config = message.content["config"] if "config" in message.content.config_records else {}
    if config.get("event") == RUN_FINISHED:
        numbers = {k: config[k] for k in ("eval_accuracy", "eval_loss") if isinstance(config.get(k), float)}
        result = ", ".join(f"{k} {value:.4f}" for k, value in numbers.items())
        status = config.get("status", "completed")
        status = status if status in RUN_STATUSES else "unknown status"  # never the coordinator's text as is
        return f"fedtune: run finished ({status}{', ' + result if result else ''})", True
    metrics = dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}
    round_number = config.get("round", "?")
    kind = message.metadata.message_type
    if kind.startswith(f"{MessageType.TRAIN}.secagg_"):  # secure aggregation's key and share exchanges
        stage = {"setup": "keys made", "share_keys": "keys shared", "unmask": "shares sent"}.get(kind.split("_", 1)[1], "stage")
        return f"fedtune: secure aggregation: {stage}", False
    if kind == MessageType.TRAIN:
        if "privacy-spent" in (reply.content["info"] if "info" in reply.content.config_records else {}):
            return f"fedtune: round {round_number}: privacy budget spent, not training", False
        loss = f"loss {metrics['train_loss']:.4f}" if "train_loss" in metrics else f"ε {metrics.get('epsilon', 0):.3f}"
        sent = payload_bytes(reply.content)
        size = f"{sent / 1e6:.2f} MB" if sent >= 1e5 else f"{sent / 1e3:.1f} KB"
        return f"fedtune: round {round_number} trained: {int(metrics.get('steps', 0))} steps, {loss}, sent {size}", False
    accuracy = f"accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else "no held-out examples"
    return f"fedtune: round {round_number} evaluated: {accuracy} on {int(metrics.get('num-examples', 0))} held-out examples", False


def _printable(text: str) -> str:
    """A name from the network, safe to print: letters, digits and ``./_-`` only."""
    return "".join(c for c in text[:80] if c.isalnum() or c in "./_-") or "unnamed"


def _client(address: str, retry_invoker, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback to our own SuperNode
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=retry_invoker,
    )
