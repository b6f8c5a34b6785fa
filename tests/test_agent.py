"""The agent's SuperNode lives: a local runtime port taken by someone else is retried on a fresh
port, and the agent's executor never talks to a listener that is not its own SuperNode."""

from __future__ import annotations

import socket

import pytest

from fedtune.client import agent
from fedtune.client.agent import AgentSettings, run_agent


def settings(tmp_path) -> AgentSettings:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a review", "label": 1}\n')
    return AgentSettings(
        coordinator="127.0.0.1:9",  # nothing listens there
        data=data,
        name="laptop",
        device="cpu",
        state_dir=tmp_path / "state",
        ca_cert=None,
        key=None,
        insecure=True,
    )


def test_a_taken_runtime_port_ends_that_supernode_life_without_touching_the_other_listener(tmp_path, monkeypatch):
    with socket.socket() as squatter:  # another agent's SuperNode got the port first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        squatter.settimeout(0.1)
        monkeypatch.setattr(agent, "free_port", lambda: squatter.getsockname()[1])
        home = tmp_path / "state" / ".flwr"
        home.mkdir(parents=True)
        failure = agent._serve(settings(tmp_path), home)
        assert failure is not None and failure[0] == "port-taken", failure
        with pytest.raises(TimeoutError):
            squatter.accept()  # the executor never connected to the squatter


def test_the_agent_starts_another_supernode_life_when_its_port_was_taken(tmp_path, monkeypatch):
    lives = iter([("port-taken", "taken"), ("port-taken", "taken"), None])
    monkeypatch.setattr(agent, "_serve", lambda settings, home: next(lives))
    assert run_agent(settings(tmp_path), echo=lambda line: None) == 0
    assert next(lives, "all used") == "all used"


def test_a_port_taken_every_time_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "_serve", lambda settings, home: ("port-taken", "the port was taken"))
    with pytest.raises(agent.UserError, match="the port was taken"):
        run_agent(settings(tmp_path), echo=lambda line: None)


def test_the_agent_prints_only_the_run_statuses_it_knows():
    """Issue 31, finding 11: the coordinator's `status` text reached the agent's terminal as sent."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedtune.client.executor import describe_task
    from flower_helpers import enter_run

    enter_run()
    for status, shown in [("completed", "completed"), ("\x1b[2J\x1b]0;pwned\x07", "unknown status")]:
        notice = {"event": "run-finished", "status": status, "eval_accuracy": 0.5, "eval_loss": "\x1b[31m"}
        message = Message(RecordDict({"config": ConfigRecord(notice)}), dst_node_id=2, message_type="query")
        line, finished = describe_task(message, Message(RecordDict(), reply_to=message))
        assert finished and line == f"fedtune: run finished ({shown}, eval_accuracy 0.5000)"
