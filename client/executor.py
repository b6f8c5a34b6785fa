"""A long-lived ClientApp process for a SuperNode in ``--isolation process`` mode.

With Flower's default subprocess isolation every train/evaluate message starts a fresh
``flwr-clientapp`` process that re-imports torch/transformers/peft (~10 s) and reloads
the base model. Here one process does what Flower's SuperExec does (acquire the next
ClientApp task from the SuperNode's Runtime API) but executes the task itself, in
process, as ``flwr-clientapp`` would: pull the message, run the ClientApp, push the
reply and the task status. The ClientApp module is imported once, so fedtune's
process-level caches keep the base model loaded across rounds and runs.

This follows flwr 1.41's ``supernode/runtime/run_clientapp.py`` and
``supercore/superexec/run_superexec.py``, minus their process exit handling.
"""

from __future__ import annotations

import threading
from logging import ERROR, WARNING

from flwr.app.error import Error
from flwr.app.message import Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

POLL_SECONDS = 0.2
TASK_RETRY_SECONDS = 60.0  # give up on a vanished SuperNode instead of retrying forever


def serve_clientapps(runtime_address: str, stop: threading.Event) -> None:
    """Execute every ClientApp task the local SuperNode hands out, until ``stop`` is set."""
    single_try = make_simple_http_retry_invoker()
    single_try.max_tries = 1  # failures come back to this loop, where `stop` is checked
    dispatcher = _client(runtime_address, single_try, RuntimeVersionHttpInterceptor(component_name="flower-superexec"))
    load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    installed: set[str] = set()
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
                run_task(runtime_address, response.token, load_client_app, installed)
            else:
                stop.wait(POLL_SECONDS)
    finally:
        dispatcher.close()


def run_task(runtime_address: str, token: str, load_client_app, installed: set[str]) -> None:
    """One ClientApp execution (a train or evaluate message), in this process."""
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
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp failed"
    try:
        message, context, run, fab = pull_task_input(client)
        if fab.hash_str not in installed or not get_project_dir(run.fab_id, run.fab_version, fab.hash_str).exists():
            install_from_fab(fab.content, skip_prompt=True)
            installed.add(fab.hash_str)
        app = load_client_app(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the coordinator gets the reason; the agent keeps serving
        log(ERROR, "ClientApp raised an exception: %s", ex, exc_info=ex)
        details = f"{type(ex).__name__}: {ex}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as ex:  # e.g. the coordinator restarted mid-round: that run's reply is moot
            log(WARNING, "could not deliver the reply (%s); waiting for the next task", ex)
        finally:
            heartbeat.stop()
            client.close()


def _client(address: str, retry_invoker, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback to our own SuperNode
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=retry_invoker,
    )
