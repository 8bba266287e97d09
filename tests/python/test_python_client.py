"""The Python client path: a W4A8 model written by the C++ tool loads and runs in Python with the
three-line recipe of the README, and gives the output the C++ `duquant run` gives."""
import os
import subprocess
import sys

import pytest
import torch

CLI = os.environ["DUQUANT_CLI"]
OPS_LIBRARY = os.environ["DUQUANT_OPS_LIBRARY"]
FIXTURES = os.environ["DUQUANT_FIXTURE_DIR"]
# The exclude regex of the user's note (shared/spec/vision_exclusion_verified.md).
NOTE_EXCLUDE = r"(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)"


def load_inputs(path):
    container = torch.jit.load(path)
    return [getattr(container, f"arg{i}") for i in range(len(container.arg_names))]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    directory = tmp_path_factory.mktemp("python_client")
    model = os.path.join(FIXTURES, "pi0_tiny_script.pt")
    inputs = os.path.join(FIXTURES, "pi0_tiny.inputs.pt")
    output = str(directory / "pi0_w4a8.pt")
    env = dict(os.environ, OPENPI_DUQUANT_EXCLUDE=NOTE_EXCLUDE)
    subprocess.run([CLI, "quantize", model, "-o", output, "--calib", inputs, "--rotation-steps", "32"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    cpp_output = str(directory / "cpp_output.pt")
    subprocess.run([CLI, "run", output, "--inputs", inputs, "--save", cpp_output], check=True,
                   stdout=subprocess.DEVNULL)
    return output, inputs, cpp_output


def test_python_runs_the_quantized_model_like_cpp(quantized):
    output, inputs, cpp_output = quantized
    torch.ops.load_library(OPS_LIBRARY)
    model = torch.jit.load(output)
    with torch.no_grad():
        actions = model(*load_inputs(inputs))
    expected = torch.jit.load(cpp_output).output
    assert actions.shape == expected.shape == (1, 50, 32)
    assert torch.allclose(actions, expected, rtol=0, atol=1e-6), (actions - expected).abs().max()
    kinds = [m.original_name for _, m in model.named_modules()]
    assert kinds.count("W4A8Linear") == 252
    buffers = dict(model.named_buffers())
    packed = buffers["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.down_proj.packed_weight"]
    assert packed.dtype == torch.uint8


def test_without_the_op_library_loading_fails_clearly(quantized):
    output, _, _ = quantized
    probe = subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({output!r})"],
                           capture_output=True, text=True)
    assert probe.returncode != 0
    assert "Unknown builtin op: duquant::w4a8_linear" in probe.stderr, probe.stderr[-500:]
