"""Quantizing the tiny lerobot exports: `duquant quantize` with no scope given replaces the 252
targets, `verify` on held-out inputs reports a small end-to-end error, and Python runs the
quantized model like `duquant run`."""
import os
import re

import pytest
import torch

from lerobot_fixtures import NOTE_ENVIRONMENT, OPS_LIBRARY, load_inputs, paths, run


@pytest.fixture(scope="module")
def quantized(policy, tmp_path_factory):
    files = paths(policy)
    output = str(tmp_path_factory.mktemp(f"lerobot_{policy}") / f"{policy}_w4a8.pt")
    # Until `--calib DIR` lands, one calibration observation from the calibration set.
    result = run(["quantize", files["model"], "-o", output, "--calib", os.path.join(files["calib"], "obs_000.inputs.pt"),
                  "--rotation-steps", "16", "--weight-clip", "1.0"], NOTE_ENVIRONMENT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "[DUQUANT] Total layers replaced: 252" in result.stdout
    return output


def test_verify_on_held_out_inputs(policy, quantized):
    result = run(["verify", paths(policy)["model"], quantized, "--inputs", paths(policy)["heldout"]])
    assert result.returncode == 0, result.stderr
    match = re.search(r"\[DUQUANT\]\[VERIFY\] end-to-end: relative L2 (\S+), cosine ([^,\s]+)", result.stdout)
    assert match, result.stdout[:2000]
    relative_l2, cosine = float(match.group(1)), float(match.group(2))
    # W4A8 on random tiny weights: close to the original, not equal to it.
    assert 0 < relative_l2 < 0.5 and cosine > 0.85, result.stdout[:500]
    assert len(re.findall(r"^  model\.paligemma_with_expert\.\S+ .* rel L2 ", result.stdout, re.MULTILINE)) == 252


def test_python_loads_and_runs_the_quantized_model_like_cpp(policy, quantized, tmp_path):
    cpp_output = str(tmp_path / "cpp.pt")
    result = run(["run", quantized, "--inputs", paths(policy)["heldout"], "--save", cpp_output])
    assert result.returncode == 0, result.stderr
    torch.ops.load_library(OPS_LIBRARY)
    model = torch.jit.load(quantized)
    _, inputs = load_inputs(paths(policy)["heldout"])
    with torch.no_grad():
        actions = model(*inputs)
    expected = torch.jit.load(cpp_output).output
    assert actions.shape == expected.shape == inputs[-1].shape
    assert torch.allclose(actions.float(), expected.float(), rtol=0, atol=1e-5)
    assert [m.original_name for _, m in model.named_modules()].count("W4A8Linear") == 252


