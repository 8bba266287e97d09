"""Shared by the lerobot export tests: the tiny fixtures of scripts/make_lerobot_fixtures.sh (a
random-weight tiny policy written with save_pretrained, then exported from that directory) and
helpers to read inputs and run the CLI."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_lerobot  # noqa: E402,F401  (the tests use it through this module)

CLI = os.environ["DUQUANT_CLI"]
OPS_LIBRARY = os.environ["DUQUANT_OPS_LIBRARY"]
FIXTURES = os.path.join(os.environ["DUQUANT_FIXTURE_DIR"], "lerobot")
# The exclude regex of the user's note (shared/spec/vision_exclusion_verified.md), and nothing else.
NOTE_ENVIRONMENT = {"OPENPI_DUQUANT_EXCLUDE":
                    r"(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)"}
POLICIES = ["pi0", "pi05"]
# scripts/make_lerobot_fixtures.sh exports pi0 in float32 and pi0.5 in lerobot's bfloat16 precision.
EXPORT_DTYPES = {"pi0": "float32", "pi05": "bfloat16"}


def paths(policy):
    stem = os.path.join(FIXTURES, f"{policy}_lerobot_tiny")
    return {"model": f"{stem}.pt", "inputs": f"{stem}.inputs.pt", "calib": f"{stem}.calib",
            "heldout": f"{stem}.heldout.inputs.pt", "checkpoint": os.path.join(FIXTURES, f"{policy}_tiny_checkpoint")}


def load_inputs(path):
    container = torch.jit.load(path)
    return list(container.arg_names), [getattr(container, f"arg{i}") for i in range(len(container.arg_names))]


def run(arguments, environment=None):
    clean = {key: value for key, value in os.environ.items() if not key.startswith("OPENPI_DUQUANT_")}
    return subprocess.run([CLI, *arguments], capture_output=True, text=True, env={**clean, **(environment or {})})
