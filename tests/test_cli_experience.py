"""What a user meets when a command is mistyped or cannot run (issue 16): one line, and a retry that works."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, run_cli

QUICKSTART = "simulations/configs/quickstart.yaml"


def _error_lines(result) -> list[str]:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()


def test_a_mistyped_command_gets_one_line_and_a_suggestion():
    lines = _error_lines(run_cli("simulat", QUICKSTART))
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: argument command: invalid choice: 'simulat'")
    assert lines[0].endswith("did you mean 'simulate'?")
    lines = _error_lines(run_cli("partition", QUICKSTART, "--bogus"))
    assert lines == ["fedtune: error: unrecognized arguments: --bogus"]  # no "fedtune: error: fedtune: ..."


def test_target_modules_that_match_nothing_are_refused_before_anything_starts(tmp_path):
    result = run_cli("simulate", QUICKSTART, "--set", "adapter.target_modules=[query,nonexistent]",
                     "--out", str(tmp_path / "run"))  # fmt: skip
    assert _error_lines(result) == [
        "fedtune: error: adapter.target_modules: ['nonexistent'] match no layer of minilm-l6; "
        "layers that can take LoRA: dense, key, query, value"
    ]
    assert not (tmp_path / "run").exists()


def test_a_cuda_device_on_a_machine_without_one_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("simulate", QUICKSTART, "--set", "model.device=cuda", "--out", str(tmp_path / "run"))
    assert _error_lines(result) == [
        "fedtune: error: model.device cuda: this machine has no CUDA device torch can use; set auto or cpu"
    ]


def test_a_failed_coordinator_start_does_not_block_its_retry(tmp_path):
    command = ["coordinator", QUICKSTART, "--address", "127.0.0.1:9", "--out", str(tmp_path / "run")]
    first = _error_lines(run_cli(*command))
    assert first == [
        "fedtune: error: TLS is on by default: pass --certs DIR (make one with fedtune certs DIR --host HOSTNAME), "
        "or --insecure for a plain-text try-out"
    ]
    again = run_cli(*command)
    assert _error_lines(again) == first  # not "already exists and is not empty"
    assert "holds no round yet" in again.stdout


def test_partition_never_overwrites_partitions(tmp_path):
    out = tmp_path / "parts"
    assert run_cli("partition", QUICKSTART, "--out", str(out)).returncode == 0
    before = (out / "client-0.jsonl").read_text()
    lines = _error_lines(run_cli("partition", QUICKSTART, "--set", "seed=7", "--out", str(out)))
    assert lines == [f"fedtune: error: --out {out}: already holds client-0.jsonl and others; choose another directory"]
    assert (out / "client-0.jsonl").read_text() == before


@pytest.mark.slow
def test_the_readme_coordinator_command_works_with_relative_paths_and_a_wildcard_address(tmp_path):
    """Issue 16, finding 1: relative --certs/--authorized-keys and 0.0.0.0 used to fail at key registration."""
    import shutil
    import subprocess
    import sys
    import time

    from fedtune.core.processes import free_port

    assert run_cli("certs", "certs/", "--host", "coord.example.org", cwd=tmp_path).returncode == 0
    assert run_cli("keygen", "agent-key", cwd=tmp_path).returncode == 0
    (tmp_path / "keys").mkdir()
    shutil.copy(tmp_path / "agent-key.pub", tmp_path / "keys" / "acme.pub")
    shutil.copy(REPO / QUICKSTART, tmp_path / "quickstart.yaml")
    log = tmp_path / "coordinator.log"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "coordinator", "quickstart.yaml", "--address", f"0.0.0.0:{free_port()}",
         "--certs", "certs/", "--authorized-keys", "keys/", "--out", "runs/deployed"],
        cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while "waiting for clients" not in log.read_text() and coordinator.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "TLS, 1 authorized agent keys" in log.read_text(), log.read_text()
        assert "waiting for clients" in log.read_text(), log.read_text()
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=60)


def _rounds(count: int, **fields) -> list[dict]:
    return [{"round": r, **fields} for r in range(1, count + 1)]


def test_plots_show_traffic_honestly_and_rounds_as_whole_numbers(tmp_path):
    """Issue 16: a constant traffic is a flat line from 0, a run without traffic says so, rounds are integers."""
    import matplotlib.pyplot as plt

    from fedtune.core.plots import run_figure
    from fedtune.core.rundir import RunDir
    from fedtune.simulations.compare import comparison_figure

    federated = run_figure(_rounds(3, eval_accuracy=0.5, bytes_up=1_513_200, bytes_down=1_513_200), "fed")
    traffic = federated.axes[2]
    assert traffic.get_ylim()[0] == 0 and traffic.get_ylim()[1] > 1.5132  # not zoomed onto 1.5132-1.5142 MB
    central = run_figure(_rounds(3, eval_accuracy=0.5, train_loss=0.7), "central")
    assert [t.get_text() for t in central.axes[2].texts] == ["no federated traffic"]
    for name, accuracy in (("fedit", 0.6), ("central", 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _rounds(3, eval_accuracy=accuracy, client_accuracy=accuracy))
        )
    assert RunDir(tmp_path / "fedit").metrics()
    compared = comparison_figure(tmp_path, ["fedit", "central"])
    for figure in (federated, central, compared):
        figure.canvas.draw()
        ticks = [tick for axis in figure.axes for tick in axis.get_xticks()]
        assert ticks and all(float(tick).is_integer() for tick in ticks)
        plt.close(figure)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_what_the_readme_creates_in_a_checkout_is_ignored_by_git():
    created = ["parts/", "partitions/", "agents/", "certs/", "keys/", "bundles/", "runs/"]
    result = subprocess.run(["git", "check-ignore", *created], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == created, result.stdout
