"""End to end: a real Flower simulation (Ray, real MiniLM) writes a complete run directory."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel

from conftest import run_cli, write_support_check
from fedtune.engine.base_model import load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sim") / "run"
    result = run_cli(
        "simulate",
        "simulations/configs/quickstart.yaml",
        "--out",
        str(run),
        "--set",
        "federation.clients=5",
        "--set",
        "federation.rounds=2",
        "--set",
        "client.local_steps=3",
        "--set",
        "data.eval_max_examples=120",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run, result


def test_progress_is_one_line_per_round(finished_run):
    _, result = finished_run
    rounds = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert [line.split("|")[0].split()[1] for line in rounds] == ["1/2", "2/2"]
    assert all("eval_accuracy" in line and "MB" in line for line in rounds)


def test_every_phase_before_round_one_says_what_it_does(finished_run):
    """Issue 16: Ray start-up and model loading used to be 45-100 s of silence after the header line."""
    _, result = finished_run
    lines = result.stdout.splitlines()
    before = lines[: next(i for i, line in enumerate(lines) if line.startswith("round "))]
    for phase in ("checking the data", "starting Flower's Simulation Engine", "loading minilm-l6", "sending round 1 to"):
        assert any(phase in line for line in before), (phase, before)


def test_run_directory_is_complete(finished_run):
    run, _ = finished_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["adapter"]["target_modules"] == ["query", "value"]  # resolved defaults are recorded
    assert config["data"]["labels"] == ["complaint", "praise", "question"]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert {"train_loss", "eval_accuracy", "eval_loss", "bytes_up", "bytes_down", "wall_s"} <= set(record)
        assert record["clients"] == record["sampled"] == 5
        assert record["bytes_up"] > 5 * 200_000  # 5 clients x (A, B, head) of MiniLM r=8

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2 and summary["strategy"] == "fedit"
    assert summary["final"]["eval_accuracy"] == records[-1]["eval_accuracy"]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in records)
    # every simulated client shares its process's single base-model load
    assert summary["client_base_model_loads"] == summary["client_processes"] >= 1
    assert (run / "plots" / "metrics.png").stat().st_size > 10_000


def test_checkpoint_loads_with_peft_and_matches_fedtune_evaluate(finished_run, tmp_path):
    run, _ = finished_run
    labels = yaml.safe_load((run / "config.yaml").read_text())["data"]["labels"]
    model = PeftModel.from_pretrained(
        load_base_model("minilm-l6", "classification", len(labels), torch.device("cpu")),
        run / "checkpoints" / "round-2",
    )
    model.eval()

    data = tmp_path / "check.jsonl"
    rows = write_support_check(data)
    result = run_cli("evaluate", str(run), "--data", str(data), timeout=300)
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert reported["round"] == 2 and reported["num_examples"] == 3
    phases = [line for line in result.stderr.splitlines() if line.startswith("fedtune:")]  # issue 16: not silent
    assert phases[:1] == [f"fedtune: loading {run.name}'s model"] and "evaluating round 2 on 3 examples" in phases[-1]

    from transformers import AutoTokenizer

    from fedtune.engine.base_model import model_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir("minilm-l6"))
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    accuracy = sum(labels[i] == r["label"] for i, r in zip(logits.argmax(-1).tolist(), rows)) / 3
    assert reported["eval_accuracy"] == pytest.approx(accuracy)


def test_an_existing_run_directory_is_never_overwritten(finished_run):
    run, _ = finished_run
    before = (run / "metrics.jsonl").read_text()
    result = run_cli("simulate", "simulations/configs/quickstart.yaml", "--out", str(run), timeout=120)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_flower_s_message_polling_yields_the_cpu_to_the_client_actors():
    """Flower's Simulation Engine polls every node's inbox from threads named after their target; Ray runs
    the clients at nice 15. Lowered to nice 19, the poll no longer takes the clients' cores."""
    import os
    import threading

    from fedtune.core.processes import LOWEST_PRIORITY, yield_to_clients

    stop = threading.Event()

    def add_messages_to_queue() -> None:  # the name Flower's polling thread carries
        stop.wait()

    poller, bystander = threading.Thread(target=add_messages_to_queue), threading.Thread(target=stop.wait)
    poller.start(), bystander.start()
    try:
        before = os.getpriority(os.PRIO_PROCESS, bystander.native_id)
        assert yield_to_clients() == 1
        assert os.getpriority(os.PRIO_PROCESS, poller.native_id) == LOWEST_PRIORITY
        assert os.getpriority(os.PRIO_PROCESS, bystander.native_id) == before < LOWEST_PRIORITY
    finally:
        stop.set()
        poller.join(), bystander.join()
