#!/usr/bin/env python3
"""Exports a lerobot (or openpi) pi0 / pi0.5 PyTorch policy as the TorchScript file duquant reads.

Neither lerobot nor openpi ships an export path. This script builds a lerobot 0.6.1 `PI0Policy` or
`PI05Policy` - from a local directory in lerobot's `from_pretrained` layout (config.json +
model.safetensors; no hub access), or with random weights at `tiny` size (reduced widths, same
module tree: the test fixtures) or `full` size - and traces the whole `sample_actions` (SigLIP,
the prefix through the LLM with its KV cache, the N Euler denoise steps of the expert, the action
projection) with flat tensor inputs:

  pi0:  forward(images[B,cams,3,H,W], image_masks[B,cams] bool, tokens[B,L] int64,
                token_masks[B,L] bool, state[B,32], noise[B,chunk,32]) -> actions[B,chunk,32]
  pi05: forward(images, image_masks, tokens, token_masks, noise) -> actions   (the state is in the prompt)

The policy's module sits under `model`, as in lerobot, so the traced paths start with
`model.paligemma_with_expert.` (duquant detects that scope). Writes, for `--out DIR/NAME.pt`
(layout of the project's FORMATS note):

  NAME.pt                     the traced model
  NAME.inputs.pt              example inputs (the ones traced with)
  NAME.calib/obs_XXX.inputs.pt   calibration observations (--calib-count, default 16)
  NAME.heldout.inputs.pt      held-out evaluation inputs (seeds no calibration observation uses)

Observations are synthetic (random images, prompt tokens and lengths, state, noise) unless
--dataset names a local LeRobot dataset directory. Before saving, the trace is run against the
eager model on inputs other than the ones it was traced with (new noise, images, state, prompt);
any difference beyond rounding is an error.

openpi users: `trace_sample_actions(model, inputs)` works on any module with lerobot's
`sample_actions(images, img_masks, lang_tokens, lang_masks, [state,] noise=...)` or openpi's
`sample_actions(device, observation, noise=None, num_steps=10)` signature (README, "From a lerobot
or openpi checkpoint").
"""

import argparse
import contextlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

# No hub access at run time: every lerobot / transformers lookup stays on the local disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn as nn
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pi0 import ExampleInputs  # noqa: E402  (the one definition of the inputs container)

CAMERAS = 3  # random-weight policies get lerobot's three pi0 views
DEFAULT_CALIBRATION_COUNT = 16
# Seeds: the example inputs use `seed`, calibration observation i uses seed + 1 + i, the trace
# check and the held-out inputs use seeds above every calibration seed.
HELDOUT_SEED_OFFSET = 100_000
CHECK_SEED_OFFSET = 200_000

INPUT_NAMES_WITH_STATE = ["images", "image_masks", "tokens", "token_masks", "state", "noise"]
INPUT_NAMES_WITHOUT_STATE = ["images", "image_masks", "tokens", "token_masks", "noise"]


class ExportError(Exception):
    """A failure the user can act on; printed as one line."""


# --------------------------------------------------------------------------------------------------
# The flat-input wrapper
# --------------------------------------------------------------------------------------------------

def calling_convention(model: nn.Module) -> str:
    """'openpi' for sample_actions(device, observation, ...), 'lerobot_pi0' / 'lerobot_pi05' for
    lerobot's flat signatures (with / without a state argument)."""
    if not hasattr(model, "sample_actions"):
        raise ExportError(f"{type(model).__name__} has no sample_actions method; give a pi0 / pi0.5 model "
                          "(lerobot PI0Pytorch / PI05Pytorch, or openpi PI0Pytorch)")
    names = list(inspect.signature(model.sample_actions).parameters)
    if names[:2] == ["device", "observation"]:
        return "openpi"
    if len(names) >= 5 and names[4] == "state":
        return "lerobot_pi0"
    if len(names) >= 5 and names[4] == "noise":
        return "lerobot_pi05"
    raise ExportError(f"{type(model).__name__}.sample_actions{inspect.signature(model.sample_actions)} has neither "
                      "lerobot's (images, img_masks, tokens, masks, [state,] noise) nor openpi's (device, "
                      "observation, noise) signature")


def openpi_observation_type():
    """openpi's Observation when openpi is installed; otherwise a stand-in with its field names."""
    try:
        from openpi.models.model import Observation  # type: ignore
        return Observation
    except ImportError:
        return SimpleNamespace


def openpi_camera_keys() -> Sequence[str]:
    try:
        from openpi.models.model import IMAGE_KEYS  # type: ignore
        return IMAGE_KEYS
    except ImportError:
        return ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


class SampleActions(nn.Module):
    """`sample_actions` of `model` with flat tensor inputs; `model` stays a submodule named `model`,
    so module paths keep lerobot's `model.` prefix."""

    def __init__(self, model: nn.Module, convention: str, num_steps: Optional[int] = None):
        super().__init__()
        self.model = model
        self.convention = convention
        self.num_steps = num_steps

    def sample(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
               state: Optional[Tensor], noise: Tensor) -> Tensor:
        image_list = list(images.unbind(1))
        mask_list = list(image_masks.unbind(1))
        steps = {} if self.num_steps is None else {"num_steps": self.num_steps}
        if self.convention == "lerobot_pi0":
            # In lerobot's bfloat16 precision the state projection is bf16 while batches carry
            # float32 states; predict_action_chunk would fail on them, the export takes float32.
            if isinstance(getattr(self.model, "state_proj", None), nn.Linear):
                state = state.to(self.model.state_proj.weight.dtype)
            return self.model.sample_actions(image_list, mask_list, tokens, token_masks, state, noise=noise, **steps)
        if self.convention == "lerobot_pi05":
            return self.model.sample_actions(image_list, mask_list, tokens, token_masks, noise=noise, **steps)
        keys = openpi_camera_keys()
        observation = openpi_observation_type()(
            images=dict(zip(keys, image_list)), image_masks=dict(zip(keys, mask_list)), state=state,
            tokenized_prompt=tokens, tokenized_prompt_mask=token_masks)
        return self.model.sample_actions(noise.device, observation, noise=noise, **steps)


class SampleActionsWithState(SampleActions):
    def forward(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, state: Tensor,
                noise: Tensor) -> Tensor:
        return self.sample(images, image_masks, tokens, token_masks, state, noise)


class SampleActionsWithoutState(SampleActions):
    def forward(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                noise: Tensor) -> Tensor:
        return self.sample(images, image_masks, tokens, token_masks, None, noise)


def wrap_sample_actions(model: nn.Module, num_steps: Optional[int] = None) -> SampleActions:
    convention = calling_convention(model)
    wrapper_type = SampleActionsWithoutState if convention == "lerobot_pi05" else SampleActionsWithState
    return wrapper_type(model, convention, num_steps).eval()


def input_names(wrapper: SampleActions) -> List[str]:
    return INPUT_NAMES_WITHOUT_STATE if isinstance(wrapper, SampleActionsWithoutState) else INPUT_NAMES_WITH_STATE


def as_arguments(observation: Dict[str, Tensor], names: Sequence[str]) -> tuple:
    return tuple(observation[name] for name in names)


def trace_sample_actions(model: nn.Module, example: Dict[str, Tensor], check: Sequence[Dict[str, Tensor]],
                         num_steps: Optional[int] = None, tolerance: Optional[float] = None) -> torch.jit.ScriptModule:
    """Traces model.sample_actions with the flat inputs of `example` (a dict with the keys of
    INPUT_NAMES_*), then checks the trace against eager on every observation of `check`."""
    wrapper = wrap_sample_actions(model, num_steps)
    names = input_names(wrapper)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, as_arguments(example, names), check_trace=False)
    check_trace_matches_eager(wrapper, traced, check, names, tolerance)
    return traced


def check_trace_matches_eager(eager: nn.Module, traced: torch.jit.ScriptModule, observations: Sequence[Dict[str, Tensor]],
                              names: Sequence[str], tolerance: Optional[float]) -> float:
    """Largest relative difference (max |trace - eager| / max |eager|) over `observations`; raises
    when it exceeds the tolerance (default: tight for float32, bf16 rounding for bfloat16)."""
    worst = 0.0
    for observation in observations:
        arguments = as_arguments(observation, names)
        # One-shot runs: the profiling executor would re-optimise the unrolled trace on its 2nd call.
        with torch.no_grad(), torch.jit.optimized_execution(False):
            expected = eager(*arguments).float()
            actual = traced(*arguments).float()
        if not torch.isfinite(expected).all():
            raise ExportError("the eager model's output is not finite on the check inputs")
        limit = tolerance if tolerance is not None else (2e-2 if expected.dtype == torch.bfloat16 else 1e-4)
        if actual.shape != expected.shape:
            raise ExportError(f"trace and eager outputs differ in shape: {tuple(actual.shape)} vs {tuple(expected.shape)}")
        difference = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, difference)
        if difference > limit:
            raise ExportError(f"the trace differs from the eager model on fresh inputs (relative max difference "
                              f"{difference:.3g} > {limit:g}): sample_actions has input-dependent control flow the "
                              "trace froze; do not use this export")
    return worst


# --------------------------------------------------------------------------------------------------
# lerobot policies: tiny / full random weights, or a local from_pretrained directory
# --------------------------------------------------------------------------------------------------

@dataclass
class TinyDimensions:
    """Reduced widths, the real depths (27 SigLIP, 18 LLM, 18 expert layers): the module tree and
    the Linear kinds stay those of the full model. Gemma heads stay 8 query / 1 KV (lerobot's joint
    attention hard-codes 8 heads)."""
    llm_width: int = 64
    llm_mlp: int = 128
    expert_width: int = 32
    expert_mlp: int = 64
    head_dim: int = 16
    vision_width: int = 32
    vision_mlp: int = 64
    vision_heads: int = 2
    vocab: int = 1024
    image_size: int = 112


@contextlib.contextmanager
def tiny_lerobot_sizes(dimensions: TinyDimensions):
    """While active, lerobot's pi0 / pi0.5 constructors build the tiny model: the Gemma variant
    table and the hard-coded vision sizes (intermediate 4304, projection_dim 2048, vocab 257152)
    are patched at the two places lerobot reads them."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    def gemma_config(variant: str):
        if variant == "gemma_2b":
            return modeling_pi0.GemmaConfig(width=dimensions.llm_width, depth=18, mlp_dim=dimensions.llm_mlp,
                                            num_heads=8, num_kv_heads=1, head_dim=dimensions.head_dim)
        if variant == "gemma_300m":
            return modeling_pi0.GemmaConfig(width=dimensions.expert_width, depth=18, mlp_dim=dimensions.expert_mlp,
                                            num_heads=8, num_kv_heads=1, head_dim=dimensions.head_dim)
        raise ValueError(f"Unknown variant: {variant}")

    originals = {}

    def patch(module, name, replacement):
        originals[(module, name)] = getattr(module, name)
        setattr(module, name, replacement)

    for module in (modeling_pi0, modeling_pi05):
        real_paligemma = getattr(module, "PaliGemmaForConditionalGenerationWithPiGemma")
        real_expert = getattr(module, "PiGemmaForCausalLM")

        def paligemma(config, _real=real_paligemma):
            vision = config.vision_config
            vision.hidden_size = dimensions.vision_width
            vision.intermediate_size = dimensions.vision_mlp
            vision.num_attention_heads = dimensions.vision_heads
            vision.projection_dim = config.text_config.hidden_size
            config.text_config.vocab_size = dimensions.vocab
            config._vocab_size = dimensions.vocab  # noqa: SLF001
            config.image_token_index = dimensions.vocab
            return _real(config=config)

        def expert(config, _real=real_expert):
            config.vocab_size = dimensions.vocab
            return _real(config=config)

        patch(module, "get_gemma_config", gemma_config)
        patch(module, "PaliGemmaForConditionalGenerationWithPiGemma", paligemma)
        patch(module, "PiGemmaForCausalLM", expert)
    try:
        yield
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)


def policy_class(policy_type: str):
    if policy_type == "pi0":
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy
        return PI0Policy
    if policy_type == "pi05":
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy
        return PI05Policy
    raise ExportError(f"policy type '{policy_type}' is not pi0 or pi05")


def new_config(policy_type: str, dtype: str, image_size: Optional[int]):
    from lerobot.configs.types import FeatureType, PolicyFeature
    if policy_type == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as ConfigType
    else:
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as ConfigType
    kwargs = {"dtype": dtype, "device": "cpu"}
    if image_size:
        kwargs["image_resolution"] = (image_size, image_size)
    config = ConfigType(**kwargs)
    resolution = config.image_resolution
    config.input_features = {
        f"observation.images.camera{i}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, *resolution))
        for i in range(CAMERAS)
    }
    config.input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(config.max_state_dim,))
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(config.max_action_dim,))}
    return config


@contextlib.contextmanager
def construct_paligemma_in(dtype: torch.dtype):
    """While active, lerobot's PaliGemmaWithExpertModel allocates its parameters in `dtype`. lerobot
    builds it in float32 and then casts: for a full-size bf16 pi0 that is a 16 GB peak for an 8 GB
    model. Its own cast (vision tower and norms back to float32) still runs."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    originals = {module: module.PaliGemmaWithExpertModel for module in (modeling_pi0, modeling_pi05)}

    def constructor(real):
        def construct(*args, **kwargs):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                return real(*args, **kwargs)
            finally:
                torch.set_default_dtype(previous)
        return construct

    for module, real in originals.items():
        module.PaliGemmaWithExpertModel = constructor(real)
    try:
        yield
    finally:
        for module, real in originals.items():
            module.PaliGemmaWithExpertModel = real


def build_random_policy(policy_type: str, size: str, dtype: str, seed: int):
    torch.manual_seed(seed)
    precision = construct_paligemma_in(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if size == "tiny":
        dimensions = TinyDimensions()
        with tiny_lerobot_sizes(dimensions), precision:
            return policy_class(policy_type)(new_config(policy_type, dtype, dimensions.image_size))
    with precision:
        return policy_class(policy_type)(new_config(policy_type, dtype, None))


def load_checkpoint_policy(directory: str, size: str, dtype: Optional[str]):
    """A policy from a local from_pretrained directory. lerobot's from_pretrained returns a model
    with random weights when it cannot read model.safetensors (it only prints a warning), so every
    tensor of the file is compared with the loaded policy afterwards."""
    from safetensors.torch import load_file
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ExportError(f"'{path}' does not exist; --checkpoint takes a directory in lerobot's from_pretrained "
                              "layout (config.json + model.safetensors), e.g. written by policy.save_pretrained")
    with open(config_path) as file:
        policy_type = json.load(file).get("type")
    cls = policy_class(policy_type)
    from lerobot.configs.policies import PreTrainedConfig
    config = PreTrainedConfig.from_pretrained(directory, local_files_only=True)
    if dtype:
        config.dtype = dtype
    config.device = "cpu"
    sizes = tiny_lerobot_sizes(TinyDimensions()) if size == "tiny" else contextlib.nullcontext()
    precision = construct_paligemma_in(torch.bfloat16 if config.dtype == "bfloat16" else torch.float32)
    with sizes, precision, contextlib.redirect_stdout(sys.stderr):
        policy = cls.from_pretrained(directory, config=config, local_files_only=True, strict=True)
    saved = load_file(weights_path)
    loaded = policy.state_dict()
    for key, tensor in saved.items():
        name = key if key in loaded else f"model.{key}"
        if name not in loaded:
            raise ExportError(f"'{weights_path}' holds '{key}', which the {policy_type} policy does not have; is "
                              f"--size right (tiny checkpoints need --size tiny)?")
        # --dtype may have cast the policy: compare in its precision.
        if loaded[name].shape != tensor.shape or not torch.equal(loaded[name], tensor.to(loaded[name].dtype)):
            raise ExportError(f"'{key}' of '{weights_path}' was not loaded into the policy; the checkpoint does not "
                              "fit this lerobot version or --size")
    return policy, policy_type


# --------------------------------------------------------------------------------------------------
# Observations
# --------------------------------------------------------------------------------------------------

def synthetic_observation(policy, policy_type: str, seed: int, batch: int) -> Dict[str, Tensor]:
    """SigLIP-normalised images in [-1, 1], a prompt of random length and tokens (padding masked),
    a state and the flow-matching noise, all from `seed`."""
    config = policy.config
    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_resolution
    cameras = len(config.image_features)
    vocab = policy.model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.num_embeddings
    length = config.tokenizer_max_length
    prompt = torch.randint(max(2, length // 4), length + 1, (batch,), generator=generator)
    positions = torch.arange(length)[None, :]
    observation = {
        "images": torch.rand(batch, cameras, 3, height, width, generator=generator) * 2 - 1,
        "image_masks": torch.ones(batch, cameras, dtype=torch.bool),
        "tokens": torch.randint(0, vocab, (batch, length), generator=generator) * (positions < prompt[:, None]),
        "token_masks": positions < prompt[:, None],
        "noise": torch.randn(batch, config.chunk_size, config.max_action_dim, generator=generator),
    }
    if policy_type == "pi0":
        observation["state"] = torch.randn(batch, config.max_state_dim, generator=generator)
    return observation


def dataset_class(directory: str):
    """lerobot's LeRobotDataset, after checking what --dataset needs (run before any work)."""
    if not os.path.isfile(os.path.join(directory, "meta", "info.json")):
        raise ExportError(f"--dataset '{directory}' is not a LeRobot dataset directory (no meta/info.json); give the "
                          "local dataset root")
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as error:
        raise ExportError(f"--dataset needs lerobot's dataset extra ({str(error).splitlines()[0]}); install it with "
                          ".venv/bin/pip install 'lerobot[dataset]==0.6.1'")
    return LeRobotDataset


def dataset_observations(policy, policy_type: str, directory: str, count: int, seed: int,
                         tokenizer: Optional[str]) -> List[Dict[str, Tensor]]:
    """`count` frames spread over a local LeRobot dataset (lerobot's LeRobotDataset with root=
    directory; needs `pip install lerobot[dataset]`), run through the policy's own input
    preparation; prompts tokenised with the PaliGemma tokenizer from `tokenizer` (a local
    directory) or the local Hugging Face cache."""
    LeRobotDataset = dataset_class(directory)
    from transformers import AutoTokenizer
    try:
        tokenize = AutoTokenizer.from_pretrained(tokenizer or "google/paligemma-3b-pt-224", local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any loader failure means the same fix)
        raise ExportError(f"no PaliGemma tokenizer on this disk ({type(error).__name__}); pass --tokenizer DIR "
                          "(a directory written by tokenizer.save_pretrained)")
    dataset = LeRobotDataset(os.path.basename(os.path.normpath(directory)), root=directory)
    config = policy.config
    generator = torch.Generator().manual_seed(seed)
    picks = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    observations = []
    for index in picks:
        frame = {key: value[None] if isinstance(value, Tensor) else [value] for key, value in dataset[index].items()}
        encoded = tokenize(frame["task"], padding="max_length", max_length=config.tokenizer_max_length,
                           truncation=True, return_tensors="pt")
        frame[OBSERVATION_TOKENS] = encoded["input_ids"]
        frame[OBSERVATION_TOKEN_MASKS] = encoded["attention_mask"].bool()
        noise = torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator)
        arguments = lerobot_flat_inputs(config, frame, noise)
        names = INPUT_NAMES_WITH_STATE if policy_type == "pi0" else INPUT_NAMES_WITHOUT_STATE
        observations.append(dict(zip(names, arguments)))
    return observations


OBSERVATION_TOKENS = "observation.language.tokens"  # lerobot.utils.constants.OBS_LANGUAGE_TOKENS
OBSERVATION_TOKEN_MASKS = "observation.language.attention_mask"


def lerobot_flat_inputs(config, batch: Dict[str, Tensor], noise: Tensor) -> tuple:
    """The exported model's forward arguments from a lerobot batch after the policy's preprocessor
    (normalised state, tokenised prompt): what PI0Policy / PI05Policy.predict_action_chunk hands to
    sample_actions, prepared by lerobot's own code (_preprocess_images, prepare_state) without the
    policy's weights. `noise` [B, chunk_size, max_action_dim] is the flow-matching start (randn).
    Slice the model's output to the dataset's action dimension and run the postprocessor, as
    predict_action_chunk does."""
    device = noise.device
    preparer = SimpleNamespace(config=config, parameters=lambda: iter([torch.empty(0, device=device)]))
    cls = policy_class(config.type)
    images, masks = cls._preprocess_images(preparer, batch)  # noqa: SLF001  (lerobot's image preparation)
    arguments = [torch.stack(images, 1), torch.stack(masks, 1), batch[OBSERVATION_TOKENS].to(device),
                 batch[OBSERVATION_TOKEN_MASKS].to(device).bool()]
    if config.type == "pi0":
        arguments.append(cls.prepare_state(preparer, batch).to(device))
    arguments.append(noise)
    return tuple(arguments)


def save_inputs(observation: Dict[str, Tensor], names: Sequence[str], path: str) -> None:
    """The inputs container duquant reads (buffers arg0.. in forward order, names in arg_names)."""
    temporary = f"{path}.tmp{os.getpid()}"
    torch.jit.save(torch.jit.script(ExampleInputs(list(names), list(as_arguments(observation, names)))), temporary)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def sibling_paths(model_path: str) -> Dict[str, str]:
    if not model_path.endswith(".pt"):
        raise ExportError(f"--out '{model_path}' must end in .pt (NAME.pt; inputs go to NAME.*.inputs.pt)")
    stem = model_path[:-3]
    return {"inputs": f"{stem}.inputs.pt", "calib": f"{stem}.calib", "heldout": f"{stem}.heldout.inputs.pt"}


def export(args) -> int:
    started = time.perf_counter()
    if not args.out and not args.save_checkpoint:
        raise ExportError("give --out NAME.pt (or --save-checkpoint DIR to only write the policy)")
    if args.out:
        paths = sibling_paths(args.out)
        directory = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(directory):
            raise ExportError(f"output directory '{directory}' does not exist; create it first")
    if args.dataset:
        dataset_class(args.dataset)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype] if args.dtype else None
    if args.checkpoint:
        policy, policy_type = load_checkpoint_policy(args.checkpoint, args.size or "full", dtype)
        if args.policy and args.policy != policy_type:
            raise ExportError(f"--policy {args.policy} but '{args.checkpoint}' holds a {policy_type} policy; drop --policy")
    else:
        if not args.policy or not args.size:
            raise ExportError("without --checkpoint, give --policy pi0|pi05 and --size tiny|full (random weights)")
        policy_type = args.policy
        policy = build_random_policy(policy_type, args.size, dtype or "bfloat16", args.seed)
    policy.eval()
    parameters = sum(p.numel() for p in policy.parameters())
    print(f"[export] {policy_type} policy: {parameters / 1e6:.1f} M parameters, built in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.save_checkpoint:
        policy.save_pretrained(args.save_checkpoint)
        print(f"[export] wrote checkpoint directory {args.save_checkpoint}")
        if not args.out:
            return 0

    wrapper = wrap_sample_actions(policy.model)
    names = input_names(wrapper)
    example = synthetic_observation(policy, policy_type, args.seed, args.batch)
    if args.dataset:
        calibration = dataset_observations(policy, policy_type, args.dataset, args.calib_count + 1, args.seed,
                                           args.tokenizer)
        heldout = calibration.pop()
    else:
        calibration = [synthetic_observation(policy, policy_type, args.seed + 1 + i, args.batch)
                       for i in range(args.calib_count)]
        heldout = synthetic_observation(policy, policy_type, args.seed + HELDOUT_SEED_OFFSET, args.batch)

    traced_at = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, as_arguments(example, names), check_trace=False)
    print(f"[export] traced sample_actions in {time.perf_counter() - traced_at:.1f} s", flush=True)
    checks = [synthetic_observation(policy, policy_type, args.seed + CHECK_SEED_OFFSET + i, args.batch)
              for i in range(args.check_count)]
    checked_at = time.perf_counter()
    difference = check_trace_matches_eager(wrapper, traced, checks, names, args.tolerance)
    print(f"[export] trace == eager on {len(checks)} fresh observations (relative max difference {difference:.2e}), "
          f"{time.perf_counter() - checked_at:.1f} s", flush=True)

    temporary = f"{args.out}.tmp{os.getpid()}"
    try:
        torch.jit.save(traced, temporary)
        os.replace(temporary, args.out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    save_inputs(example, names, paths["inputs"])
    os.makedirs(paths["calib"], exist_ok=True)
    for stale in os.listdir(paths["calib"]):
        if stale.endswith(".inputs.pt"):
            os.remove(os.path.join(paths["calib"], stale))
    for i, observation in enumerate(calibration):
        save_inputs(observation, names, os.path.join(paths["calib"], f"obs_{i:03d}.inputs.pt"))
    save_inputs(heldout, names, paths["heldout"])
    print(f"[export] wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB), {paths['inputs']}, "
          f"{len(calibration)} calibration observations in {paths['calib']}/, {paths['heldout']}; "
          f"forward({', '.join(names)}); total {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=["pi0", "pi05"], help="policy type (read from the checkpoint when given)")
    parser.add_argument("--checkpoint", help="local directory in lerobot's from_pretrained layout")
    parser.add_argument("--size", choices=["tiny", "full"],
                        help="random weights at this size; with --checkpoint, the size it was saved at (default full)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"],
                        help="bf16: lerobot's bfloat16 precision (vision tower and norms stay float32); fp32. "
                             "Default: the checkpoint's, bf16 for random weights")
    parser.add_argument("--out", help="the model file NAME.pt; inputs are written next to it")
    parser.add_argument("--dataset", help="local LeRobot dataset directory for the calibration / held-out observations")
    parser.add_argument("--tokenizer", help="local PaliGemma tokenizer directory (with --dataset)")
    parser.add_argument("--calib-count", type=int, default=DEFAULT_CALIBRATION_COUNT)
    parser.add_argument("--check-count", type=int, default=2, help="fresh observations the trace is checked on")
    parser.add_argument("--tolerance", type=float, help="relative max difference allowed between trace and eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-checkpoint",
                        help="write the policy with save_pretrained to this directory (only that, without --out)")
    args = parser.parse_args(argv)
    try:
        return export(args)
    except ExportError as error:
        print(f"export_lerobot: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
