"""Behaviour fingerprint: does a refactoring leave ``esper train`` doing exactly what it did?

Run: ``python benchmarks/behaviour_fingerprint.py [--presets digits mnist1d] [--save FILE]
[--compare FILE]`` (about a minute per preset on 2 CPU cores; each preset is a real fixed-seed
``esper train`` run in a fresh folder, its own embedded Urza included).

A fingerprint of a run is

* every record of ``metrics.jsonl`` (per-step losses and accuracies, decisions, grafts, rewards,
  seed-state changes, evaluations) with the fields that are not a function of the code and the
  seed removed: wall times and step times, the compile-monitor count ``compiling`` (a thread's
  sampling), decision ids (random uuids) and the reward's ``compute_cost`` component and total
  (they are measured from wall-clock step times);
* the sha256 of every tensor of the final checkpoint (model, optimizer, RNG states).

``--save`` writes the fingerprints (JSON) before a change; ``--compare`` runs again after it and
prints, per preset, whether the metrics and the final tensors are identical, with the first
differing record when they are not (exit status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
UNTIMED_FIELDS = ("step_time_ms", "wall_s", "compiling", "decision_id")
"""Metric fields that depend on wall time, thread timing or random ids, not on code and seed."""


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in record.items() if k not in UNTIMED_FIELDS}
    if kept.get("type") == "reward":
        kept.pop("total", None)
        kept["components"] = {
            k: v for k, v in kept.get("components", {}).items() if k != "compute_cost"
        }
    return kept


def _tensor_digests(state: Any, prefix: str = "") -> dict[str, str]:
    """sha256 of every tensor in a nested checkpoint structure, by its path."""
    found: dict[str, str] = {}
    if isinstance(state, torch.Tensor):
        data = state.detach().cpu().contiguous().reshape(-1)
        payload = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        found[prefix] = hashlib.sha256(payload + str(data.dtype).encode()).hexdigest()
    elif isinstance(state, dict):
        for key, value in state.items():
            found.update(_tensor_digests(value, f"{prefix}/{key}"))
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            found.update(_tensor_digests(value, f"{prefix}/{i}"))
    return found


def fingerprint(preset: str, workdir: Path) -> dict[str, Any]:
    """Run ``configs/<preset>.yaml`` once (its own seed) and fingerprint what it wrote."""
    run_dir = workdir / preset
    command = [
        sys.executable,
        "-m",
        "esper.cli",
        "train",
        "--config",
        str(ROOT / "configs" / f"{preset}.yaml"),
        f"run.dir={run_dir}",
        f"run.id={preset}-fingerprint",
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    folder = run_dir / f"{preset}-fingerprint"
    records = [
        _untimed(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()
    ]
    last = sorted((folder / "checkpoints").iterdir())[-1]
    tensors = torch.load(last / "tensors.pt", weights_only=True)
    return {
        "records": records,
        "metrics_sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
        "checkpoint": last.name,
        "tensors": _tensor_digests(tensors),
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints of one preset (empty: identical)."""
    problems = []
    if before["metrics_sha256"] != after["metrics_sha256"]:
        pairs = zip(before["records"], after["records"], strict=False)
        first = next(((i, a, b) for i, (a, b) in enumerate(pairs) if a != b), None)
        if first is None:
            problems.append(f"metrics: {len(before['records'])} vs {len(after['records'])} records")
        else:
            problems.append(f"metrics: record {first[0]} differs:\n  {first[1]}\n  {first[2]}")
    if before["tensors"] != after["tensors"]:
        changed = sorted(
            k for k in before["tensors"].keys() | after["tensors"].keys()
            if before["tensors"].get(k) != after["tensors"].get(k)
        )  # fmt: skip
        problems.append(f"final checkpoint: {len(changed)} tensors differ, e.g. {changed[:3]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--save", type=Path, help="write the fingerprints here")
    parser.add_argument("--compare", type=Path, help="compare against fingerprints saved here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esper-fingerprint-") as tmp:
        prints = {preset: fingerprint(preset, Path(tmp)) for preset in args.presets}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(prints, indent=1, sort_keys=True))
        print(f"saved fingerprints of {', '.join(prints)} to {args.save}")
    status = 0
    if args.compare:
        saved = json.loads(args.compare.read_text())
        for preset, after in prints.items():
            problems = compare(saved[preset], after)
            steps = sum(1 for r in after["records"] if r.get("type") == "step")
            verdict = "identical" if not problems else "DIFFERENT"
            print(f"{preset}: {verdict} ({len(after['records'])} records, {steps} step records, "
                  f"{len(after['tensors'])} final tensors)")  # fmt: skip
            for problem in problems:
                print(f"  {problem}")
            status |= bool(problems)
    return status


if __name__ == "__main__":
    sys.exit(main())
