"""Real checkpoints in: tiny lerobot pi0 and pi0.5 policies, written with save_pretrained and exported
from that directory by scripts/export_lerobot.py (scripts/make_lerobot_fixtures.sh), go through
`duquant list / quantize / verify` with no scope given, and the quantized model runs in Python."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_lerobot  # noqa: E402

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


@pytest.fixture(scope="module", params=POLICIES)
def policy(request):
    for path in paths(request.param).values():
        assert os.path.exists(path), f"{path} is missing: run scripts/make_lerobot_fixtures.sh"
    return request.param


def test_export_writes_the_formats_layout(policy):
    files = paths(policy)
    names, _ = load_inputs(files["inputs"])
    expected = ["images", "image_masks", "tokens", "token_masks"] + (["state"] if policy == "pi0" else []) + ["noise"]
    assert names == expected
    calibration = sorted(os.listdir(files["calib"]))
    assert calibration == [f"obs_{i:03d}.inputs.pt" for i in range(len(calibration))] and len(calibration) >= 2
    # Observations differ in images, prompt and noise (and state for pi0).
    first, second = load_inputs(os.path.join(files["calib"], calibration[0]))[1], load_inputs(files["heldout"])[1]
    for name, a, b in zip(names, first, second):
        if name != "image_masks":
            assert not torch.equal(a, b), name
    model = torch.jit.load(files["model"])
    assert "model.paligemma_with_expert.paligemma.model.language_model.layers.17.mlp.down_proj" in dict(
        model.named_modules())


def test_the_export_holds_the_checkpoint_weights(policy):
    from safetensors.torch import load_file
    saved = load_file(os.path.join(paths(policy)["checkpoint"], "model.safetensors"))
    parameters = dict(torch.jit.load(paths(policy)["model"]).named_parameters())
    for key in ("model.paligemma_with_expert.paligemma.model.language_model.layers.3.self_attn.q_proj.weight",
                "model.paligemma_with_expert.gemma_expert.model.layers.5.mlp.down_proj.weight"):
        assert torch.equal(parameters[key], saved[key].to(parameters[key].dtype)), key


def test_trace_equals_eager_on_fresh_inputs(policy):
    # The eager policy again from the checkpoint directory, in the precision the fixture was exported in.
    eager, policy_type = export_lerobot.load_checkpoint_policy(paths(policy)["checkpoint"], "tiny", EXPORT_DTYPES[policy])
    eager.eval()
    traced = torch.jit.load(paths(policy)["model"])
    names, _ = load_inputs(paths(policy)["inputs"])
    # Seeds no export used: new images, prompt (tokens and length), state and noise.
    fresh = [export_lerobot.synthetic_observation(eager, policy_type, 987_654, 1)]
    difference = export_lerobot.check_trace_matches_eager(export_lerobot.wrap_sample_actions(eager.model), traced,
                                                          fresh, names, None)
    assert difference <= (1e-4 if policy == "pi0" else 2e-2)


def test_list_finds_the_scope_and_252_targets_with_only_the_note_exclude(policy):
    result = run(["list", "--json", paths(policy)["model"]], NOTE_ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["targets"] == 252
    scope = next(setting for setting in listing["config"] if setting["key"] == "scope")
    assert (scope["value"], scope["source"]) == ("model.paligemma_with_expert.", "detected")
    text = run(["list", paths(policy)["model"]], NOTE_ENVIRONMENT).stdout
    assert re.search(r"^  scope +  ?= model\.paligemma_with_expert\.  \(detected\)$", text, re.MULTILINE), text[:2000]
    assert "[DUQUANT] Matched Linear layers: 252" in text


def test_an_explicit_scope_wins_over_detection(policy):
    result = run(["list", "--json", paths(policy)["model"]],
                 {**NOTE_ENVIRONMENT, "OPENPI_DUQUANT_SCOPE": "model.paligemma_with_expert.gemma_expert."})
    listing = json.loads(result.stdout)
    assert listing["targets"] == 126
    scope = next(setting for setting in listing["config"] if setting["key"] == "scope")
    assert scope["source"] == "env OPENPI_DUQUANT_SCOPE"


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
    match = re.search(r"\[DUQUANT\]\[VERIFY\] end-to-end: relative L2 (\S+), cosine (\S+)", result.stdout)
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


def test_evaluation_loop_inputs_give_what_the_policy_predicts(policy):
    """The README's evaluation loop: lerobot_flat_inputs on a preprocessed batch, then the exported
    model, equals the policy's own predict_action_chunk on that batch (same noise)."""
    eager, policy_type = export_lerobot.load_checkpoint_policy(paths(policy)["checkpoint"], "tiny", EXPORT_DTYPES[policy])
    eager.eval()
    config = eager.config
    generator = torch.Generator().manual_seed(4242)
    height, width = config.image_resolution
    batch = {key: torch.rand(1, 3, height, width, generator=generator) for key in config.image_features}
    batch["observation.state"] = torch.randn(1, config.max_state_dim, generator=generator)
    batch[export_lerobot.OBSERVATION_TOKENS] = torch.randint(0, 1000, (1, config.tokenizer_max_length), generator=generator)
    batch[export_lerobot.OBSERVATION_TOKEN_MASKS] = torch.arange(config.tokenizer_max_length)[None] < 11
    noise = torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator)
    eager.model.sample_noise = lambda shape, device: noise.clone()
    with torch.no_grad():
        expected = eager.predict_action_chunk(batch).float()
        actions = torch.jit.load(paths(policy)["model"])(*export_lerobot.lerobot_flat_inputs(config, batch, noise))
    actions = actions[:, :, : config.output_features["action"].shape[0]].float()
    tolerance = 1e-4 if EXPORT_DTYPES[policy] == "float32" else 2e-2
    assert (actions - expected).abs().max() <= tolerance * expected.abs().max()
