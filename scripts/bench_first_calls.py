#!/usr/bin/env python3
"""Time the first three calls of TorchScript models under both executors, from C++ and from Python.

TorchScript's default (profiling) executor profiles a graph on its first call and re-optimises it
on the second, so calls 1 and 2 of a freshly loaded model cost more than the steady state; with
graph optimisation off (the one-shot executor every duquant command but `run --repeat` uses) each
call runs the graph as loaded. This prints, per model, calls 1/2/3 of a fresh process for
  C++:    duquant run MODEL --inputs IN --repeat 3 --executor profiling|one-shot
  Python: torch.jit.load + torch._C._set_graph_executor_optimize(True|False), three calls
so the warm-up an evaluation loop pays can be compared with the steady state in one run.

  scripts/bench_first_calls.py [--build build] [MODEL INPUTS ...]
Default models: the generated tiny pi0 (scripted and traced) and the tiny lerobot pi0 (traced)
from build/fixtures. A W4A8 model needs the operator library, which both sides load.
"""
import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PYTHON_CALLS = r"""
import sys, time, torch
model_path, inputs_path, executor, library = sys.argv[1:5]
if library:
    torch.ops.load_library(library)
torch._C._set_graph_executor_optimize(executor == "profiling")
model = torch.jit.load(model_path)
container = torch.jit.load(inputs_path)
args = [getattr(container, f"arg{i}") for i in range(len(container.arg_names))]
times = []
with torch.no_grad():
    for _ in range(3):
        start = time.perf_counter()
        model(*args)
        times.append(1e3 * (time.perf_counter() - start))
print(" ".join(f"{t:.2f}" for t in times))
"""


def cpp_calls(cli, model, inputs, executor):
    result = subprocess.run([cli, "run", model, "--inputs", inputs, "--repeat", "3", "--executor", executor],
                            capture_output=True, text=True)
    match = re.search(r"executor, calls 1: ([0-9.]+) ms, 2: ([0-9.]+) ms, 3: ([0-9.]+) ms", result.stdout)
    if result.returncode != 0 or not match:
        sys.exit(f"bench_first_calls.py: duquant run failed on {model}: {(result.stderr or result.stdout).strip()}")
    return [float(value) for value in match.groups()]


def python_calls(model, inputs, executor, library):
    result = subprocess.run([sys.executable, "-c", PYTHON_CALLS, model, inputs, executor, library],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_first_calls.py: Python failed on {model}: {result.stderr.strip().splitlines()[-1]}")
    return [float(value) for value in result.stdout.split()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.join(ROOT, "build"), help="build directory (duquant, fixtures)")
    parser.add_argument("pairs", nargs="*", help="MODEL INPUTS pairs (default: the tiny fixtures)")
    arguments = parser.parse_args()
    cli = os.path.join(arguments.build, "duquant")
    library = os.path.join(arguments.build, "libduquant_ops.so")
    fixtures = os.path.join(arguments.build, "fixtures")
    pairs = arguments.pairs or [
        os.path.join(fixtures, "pi0_tiny_script.pt"), os.path.join(fixtures, "pi0_tiny.inputs.pt"),
        os.path.join(fixtures, "pi0_tiny_trace.pt"), os.path.join(fixtures, "pi0_tiny.inputs.pt"),
        os.path.join(fixtures, "lerobot", "pi0_lerobot_tiny.pt"),
        os.path.join(fixtures, "lerobot", "pi0_lerobot_tiny.inputs.pt"),
    ]
    if len(pairs) % 2:
        parser.error("give MODEL INPUTS pairs")
    for path in pairs + [cli, library]:
        if not os.path.exists(path):
            sys.exit(f"bench_first_calls.py: {path} is missing; run scripts/setup.sh (it builds and makes fixtures)")
    with open("/proc/loadavg") as load:
        print(f"[first calls] {os.cpu_count()} cores, load average {' '.join(load.read().split()[:3])}; "
              "ms per call of a fresh process, torch threads = its default")
    print(f"{'model':<28} {'side':<7} {'executor':<10} {'call 1':>9} {'call 2':>9} {'call 3':>9} {'1+2 vs 3':>9}")
    for model, inputs in zip(pairs[0::2], pairs[1::2]):
        for side in ("C++", "Python"):
            for executor in ("profiling", "one-shot"):
                times = (cpp_calls(cli, model, inputs, executor) if side == "C++"
                         else python_calls(model, inputs, executor, library))
                warm_up = (times[0] + times[1]) / times[2]
                print(f"{os.path.basename(model):<28} {side:<7} {executor:<10} "
                      f"{times[0]:>9.1f} {times[1]:>9.1f} {times[2]:>9.1f} {warm_up:>8.1f}x")


if __name__ == "__main__":
    main()
