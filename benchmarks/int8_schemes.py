"""int8 schemes of one trained classifier side by side: accuracy drop, size and latency against fp32.

Exports a run's model to fp32 ONNX once (fedtune's own export code), quantizes it with each
scheme ``fedtune export --quantize int8`` can fall back through (dynamic, static QDQ, static
QDQ per-channel; plus the export's own choice, ``int8_classifier`` with the default 1-point
check), and measures on the same held-out examples: accuracy drop against fp32, model bytes
against fp32, and latency per example (batch 1, one thread, p50 over ``--latency-examples``
examples, the schemes interleaved per example so that machine load hits all alike).

    python benchmarks/int8_schemes.py /tmp/dp-sweep/runs/recipe-none-fedit --out /tmp/int8-schemes
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedtune.core.rundir import RunDir
from fedtune.edge.export import CALIBRATION_EXAMPLES, QualityCheck, export_classifier
from fedtune.edge.parity import calibration_feeds, check_rows, torch_outputs
from fedtune.edge.quantize import _dynamic, _static, int8_classifier
from fedtune.engine.checkpoint import load_run_model
from fedtune.engine.data import TaskSpec, encode


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--check-examples", type=int, default=500)
    parser.add_argument("--latency-examples", type=int, default=200)
    args = parser.parse_args()
    run = RunDir.open(args.run)
    config = run.config()
    adapter, round_number = load_run_model(run, None, None, quantization="none")
    spec = TaskSpec.from_config(config)
    rows = check_rows(config, None, args.check_examples + CALIBRATION_EXAMPLES)
    checks = encode(rows[: args.check_examples], spec, adapter.tokenizer, "check data")
    calibration = calibration_feeds(encode(rows[args.check_examples :], spec, adapter.tokenizer, "calibration"))
    merged = adapter.model.merge_and_unload().eval()
    work = Path(tempfile.mkdtemp(prefix="int8-schemes-"))
    fp32 = work / "fp32.onnx"
    export_classifier(merged, fp32)
    check = QualityCheck(merged, checks, torch_outputs(merged, checks), config.model.task, max_drop=1.0, min_agreement=1.0)

    models = {"fp32": fp32}
    for name, make in {
        "dynamic": lambda out: _dynamic(fp32, out, [], False),
        "static": lambda out: _static(fp32, out, calibration, False, [], False),
        "static-per-channel": lambda out: _static(fp32, out, calibration, True, [], False),
    }.items():
        models[name] = work / f"{name}.onnx"
        make(models[name])
    models["export's choice"] = work / "chosen.onnx"
    chosen = int8_classifier(fp32, models["export's choice"], calibration, check, False)

    singles = [
        {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None]}
        for ids in (np.asarray(e["input_ids"], dtype=np.int64) for e in checks.examples[: args.latency_examples])
    ]
    sessions = {name: session(path) for name, path in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for feed in singles:
        for name, runner in sessions.items():
            started = time.perf_counter()
            runner.run(["logits"], feed)
            times[name].append(time.perf_counter() - started)
    fp32_bytes, fp32_latency = fp32.stat().st_size, statistics.median(times["fp32"])
    results = {"run": str(args.run), "round": round_number, "chosen": {k: v for k, v in chosen.items() if k != "attempts"}}
    for name, path in models.items():
        _, gate = check(path)
        latency = statistics.median(times[name])
        results[name] = {
            "accuracy": gate["accuracy_quantized"],
            "drop_points": gate["accuracy_drop_points"],
            "size_vs_fp32": round(path.stat().st_size / fp32_bytes, 3),
            "latency_ms_p50": round(1000 * latency, 2),
            "latency_vs_fp32": round(latency / fp32_latency, 3),
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"export's choice: {chosen['scheme']} (kept in float: {chosen['kept_full_precision']})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
