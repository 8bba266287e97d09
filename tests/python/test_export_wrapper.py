"""The exporter's flat-input wrapper on small stand-in modules (no lerobot model needed): openpi's
sample_actions(device, observation, ...) signature traces like eager, a trace that froze
input-dependent control flow is refused, and bad command lines fail in one line before any work."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "export_lerobot.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_lerobot  # noqa: E402


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)


class OpenpiStyle(nn.Module):
    """openpi PI0Pytorch's interface: sample_actions(device, observation, noise, num_steps), where
    observation carries dicts of camera images and masks, the state and the tokenised prompt."""

    def __init__(self):
        super().__init__()
        self.paligemma_with_expert = Expert()

    def sample_actions(self, device, observation, noise=None, num_steps=10):
        images = torch.stack(list(observation.images.values()), 1)
        masks = torch.stack(list(observation.image_masks.values()), 1).float()
        context = images.mean(dim=(2, 3, 4)) @ torch.ones(3, 8) * masks.mean(1, keepdim=True)
        prompt = (observation.tokenized_prompt.float() * observation.tokenized_prompt_mask).mean(1, keepdim=True)
        x = noise
        for _ in range(num_steps):
            x = x - 0.1 * self.paligemma_with_expert.q_proj(x + context[:, None] + prompt[:, None]
                                                            + observation.state[:, None, :8])
        return x


class FrozenBranch(nn.Module):
    """lerobot's pi0 signature with Python control flow on the prompt length: a trace freezes it."""

    def __init__(self):
        super().__init__()
        self.paligemma_with_expert = Expert()

    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None, num_steps=None):
        if int(lang_masks.sum()) > 6:
            return self.paligemma_with_expert.q_proj(noise)
        return -self.paligemma_with_expert.q_proj(noise)


def observation(seed, prompt_length):
    generator = torch.Generator().manual_seed(seed)
    length = 12
    return {"images": torch.rand(1, 3, 3, 16, 16, generator=generator) * 2 - 1,
            "image_masks": torch.ones(1, 3, dtype=torch.bool),
            "tokens": torch.randint(0, 100, (1, length), generator=generator),
            "token_masks": torch.arange(length)[None] < prompt_length,
            "state": torch.randn(1, 32, generator=generator),
            "noise": torch.randn(1, 5, 8, generator=generator)}


def test_openpi_signature_traces_like_eager_under_the_model_prefix():
    model = OpenpiStyle().eval()
    assert export_lerobot.calling_convention(model) == "openpi"
    traced = export_lerobot.trace_sample_actions(model, observation(0, 5), check=[observation(1, 9)])
    assert "model.paligemma_with_expert.q_proj" in dict(traced.named_modules())
    fresh = observation(2, 7)
    wrapper = export_lerobot.wrap_sample_actions(model)
    arguments = export_lerobot.as_arguments(fresh, export_lerobot.INPUT_NAMES_WITH_STATE)
    with torch.no_grad():
        assert torch.allclose(traced(*arguments), wrapper(*arguments), rtol=1e-5, atol=1e-6)


def test_a_trace_that_froze_input_dependent_control_flow_is_refused():
    model = FrozenBranch().eval()
    assert export_lerobot.calling_convention(model) == "lerobot_pi0"
    with pytest.raises(export_lerobot.ExportError, match="differs from the eager model on fresh inputs"):
        export_lerobot.trace_sample_actions(model, observation(0, 3), check=[observation(1, 10)])


def test_a_module_without_either_signature_is_refused():
    with pytest.raises(export_lerobot.ExportError, match="has no sample_actions"):
        export_lerobot.calling_convention(nn.Linear(2, 2))


@pytest.mark.parametrize("arguments,mention", [
    (["--policy", "pi0", "--size", "tiny", "--out", "{dir}/model.txt"], "must end in .pt"),
    (["--policy", "pi0", "--size", "tiny", "--out", "{dir}/m.pt", "--dataset", "{dir}/no_dataset"],
     "not a LeRobot dataset directory"),
    (["--checkpoint", "{dir}/no_checkpoint", "--out", "{dir}/m.pt"], "does not exist"),
    (["--out", "{dir}/missing_dir/m.pt", "--policy", "pi0", "--size", "tiny"], "does not exist; create it first"),
], ids=["out_not_pt", "dataset_not_a_lerobot_dataset", "checkpoint_missing", "out_directory_missing"])
def test_bad_command_lines_fail_in_one_line_and_write_nothing(tmp_path, arguments, mention):
    result = subprocess.run([sys.executable, SCRIPT, *[a.format(dir=tmp_path) for a in arguments]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_lerobot: error: ") and mention in lines[0], result.stderr
    assert os.listdir(tmp_path) == []
