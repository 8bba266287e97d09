"""Real checkpoints in: tiny lerobot pi0 and pi0.5 policies, exported from a save_pretrained
directory by scripts/export_lerobot.py, keep the FORMATS layout and the checkpoint's weights, trace
like the eager policy on fresh inputs and in the README's evaluation loop, and `duquant list` finds
the scope and the 252 targets with only the note's EXCLUDE set."""
import json
import os
import re

import torch

from lerobot_fixtures import EXPORT_DTYPES, NOTE_ENVIRONMENT, export_lerobot, load_inputs, paths, run


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
