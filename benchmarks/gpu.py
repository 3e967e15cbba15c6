"""One entry point for the performance benchmarks on a GPU: overhead, Hessian, scaling.

On CUDA it runs, each in its own process and with its own time limit (about 8 minutes
in all on one GPU):

* ``bench_overhead.py`` on SimpleCNN (20 epochs) and on the small CNN (10 epochs):
  default cadence and cheap signal against plain ``torch.optim.SGD``;
* ``bench_hessian.py``: cold and warm Lanczos, products and seconds;
* ``bench_scaling.py``: one full measurement vs model size and probe size, with peak
  ``torch.cuda.max_memory_allocated``.

Without CUDA it runs a reduced version of the same steps (small model, one epoch, one
training point), which is what the CI test runs: the benchmarks keep working between GPU
runs. It writes ``results.json`` (every benchmark's rows) and ``results.md`` (Markdown
tables: seconds, × SGD, HVPs, peak memory) to ``--out``.

    python benchmarks/gpu.py [--out benchmarks/results/gpu] [--reduced]
    bash benchmarks/gpu.sh            # the same, with the output folder given
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(device: str, reduced: bool) -> list[tuple[str, list[str], int]]:
    """(name, arguments after the script, time limit in s) for each benchmark run."""
    if reduced:
        return [
            ("overhead_tiny", ["bench_overhead.py", "--model", "tiny", "--epochs", "1", "--probe-size", "100",
                               "--dense-steps", "5", "--variants", "default", "--device", device], 600),
            ("hessian", ["bench_hessian.py", "--probe-size", "50", "--points", "1", "--steps-between", "1",
                         "--skip-power", "--device", device], 600),
            ("scaling", ["bench_scaling.py", "--quick", "--device", device], 600),
        ]
    return [
        ("overhead_simplecnn", ["bench_overhead.py", "--variants", "default", "cheap", "--device", device], 150),
        ("overhead_tiny", ["bench_overhead.py", "--model", "tiny", "--epochs", "10", "--variants", "default",
                           "cheap", "--device", device], 90),
        ("hessian", ["bench_hessian.py", "--skip-power", "--device", device], 90),
        ("scaling", ["bench_scaling.py", "--device", device, "--repeat", "5"], 150),
    ]


def run_all(out: Path, reduced: bool, device: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": device, "reduced": reduced, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "benchmarks": {}}
    if device == "cuda":
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    for name, argv, limit in steps(device, reduced):
        path = out / f"{name}.json"
        cmd = [sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=limit, check=False)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status, log = f"timed out after {limit} s", (err.stdout or b"").decode(errors="replace")
        seconds = time.perf_counter() - start
        (out / f"{name}.log").write_text(log)
        entry = {"status": status, "seconds": seconds, "command": " ".join(argv)}
        if path.exists():
            entry["result"] = json.loads(path.read_text())
        results["benchmarks"][name] = entry
        print(f"{name}: {status} in {seconds:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    """Markdown tables of the runs (seconds, × SGD, HVPs, peak memory)."""
    lines = [f"# Benchmarks on {results.get('gpu', results['device'])} ({results['date']}"
             f"{', reduced' if results['reduced'] else ''})", ""]
    for name, entry in results["benchmarks"].items():
        lines += [f"## {name}: {entry['status']} ({entry['seconds']:.0f} s)", "", f"`{entry['command']}`", ""]
        res = entry.get("result")
        if res is None:
            continue
        if name.startswith("overhead"):
            sgd = sum(res["sgd_seconds"]) / 2
            lines += [f"Plain SGD: {res['sgd_seconds'][0]:.2f} s and {res['sgd_seconds'][1]:.2f} s; "
                      f"peak {res['peak_sgd_mb'] or 0:.0f} MB; dense peak at step {res['dense_peak_step']}.", "",
                      "| variant | seconds | × SGD | × own training | full | HVPs | break-even (detected) "
                      "| epochs after dense peak | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
            for r in res["rows"]:
                det = r["detected"]
                late = "–" if det is None else f"{(det - res['dense_peak_step']) / res['steps_per_epoch']:+.2f}"
                lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['seconds'] / sgd:.2f} "
                             f"| {r['x own training']:.2f} | {r['full']} | {r['hvps']} | {r['break-even']} ({det}) "
                             f"| {late} | {r['peak MB'] or 0:.0f} |")
        elif name == "hessian":
            lines += [f"SGD step {res['sgd_step_s'] * 1e3:.2f} ms, one HVP {res['hvp_s'] * 1e3:.2f} ms.", "",
                      "| method | median HVPs | max HVPs | median s | × SGD step | max rel err |",
                      "|---|---|---|---|---|---|"]
            for r in res["rows"]:
                lines.append(f"| {r['method']} | {r['median hvps']} | {r['max hvps']} | {r['median s']:.4f} "
                             f"| {r['x SGD step']:.1f} | {r['max rel err']:.1e} |")
        elif name == "scaling":
            sys.path.insert(0, str(HERE))
            from bench_scaling import markdown as scaling_table

            lines.append(scaling_table(res))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"))
    ap.add_argument("--reduced", action="store_true", help="the reduced (CPU/CI) version even on CUDA")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (reduced)")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_all(Path(args.out), args.reduced or device != "cuda", device)
    failed = [n for n, e in results["benchmarks"].items() if e["status"] != "ok"]
    print(f"wrote {args.out}/results.json and results.md" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
