"""FP8 weights in the engine: checkpoint formats, the FP8 modules, and quantisation at load time.

Owns what the engine needs to run FP8 (e4m3) weights; the number formats and kernels themselves live in
`glm_kernels.fp8` and `glm_kernels.fused_moe`. Two checkpoint formats are read:
- compressed-tensors "float-quantized" (what the GLM-4.5-Air FP8 checkpoint is believed to be): per layer an
  e4m3 `weight` and an fp32 `weight_scale` [out, 1] (channel) or [1] (tensor, widened to channel here);
- block-wise FP8 (`quant_method: "fp8"`, `weight_block_size: [128, 128]`, DeepSeek / Qwen style): an e4m3
  `weight` and an fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] (multiplied in despite its name).
Static activation scales (`input_scale`) are not used: activations are either kept in bf16 (w8a16) or
quantised dynamically per token (w8a8), which is never less accurate than a static scale.

A BF16 checkpoint can be quantised at load time to either format (`QuantScheme.channel()` / `.block()`).
What stays unquantised, as in the released checkpoints: embeddings, lm_head, norms, the router, q/k/v biases.

Shape legend: E = experts, I = expert width, D = hidden, N / K = a linear's out / in features.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from glm_kernels.fp8 import (
    FP8_DTYPE,
    fp8_linear_reference,
    quantize_weight_blockwise,
    quantize_weight_per_channel,
)
from glm_kernels.triton_support import cdiv

# Modules never quantised, whatever the scheme says (matched against module names without the `model.` prefix).
ALWAYS_DENSE = ("lm_head", "embed_tokens")
# The linears a scheme quantises: attention projections, dense MLPs and shared experts (routed experts are
# stacked tensors, handled by FP8Experts).
QUANTIZABLE_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)$")


class QuantConfigError(ValueError):
    """A quantization_config the engine cannot run; the message names the field and what is supported."""


@dataclass(frozen=True)
class QuantScheme:
    """How the linears and experts hold their weights.

    block_size None: one scale per output channel; (bn, bk): one scale per bn x bk block.
    act_quant: quantise activations to e4m3 per token (per token and bk-group when block-wise) before each GEMM.
    ignore: module names (or `re:` regexes) kept in the model dtype, as the checkpoint's config lists them.
    """

    block_size: tuple[int, int] | None = None
    act_quant: bool = False
    ignore: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def channel(cls, act_quant: bool = False) -> QuantScheme:
        return cls(None, act_quant)

    @classmethod
    def block(cls, block_size: tuple[int, int] = (128, 128), act_quant: bool = False) -> QuantScheme:
        return cls(tuple(block_size), act_quant)

    @property
    def name(self) -> str:
        weights = "channel" if self.block_size is None else f"block{self.block_size[0]}x{self.block_size[1]}"
        return f"fp8-{weights}-{'w8a8' if self.act_quant else 'w8a16'}"

    def quantizes(self, module_name: str) -> bool:
        """Whether the linear `module_name` (e.g. 'layers.3.self_attn.q_proj') holds FP8 weights."""
        if any(module_name == name or module_name.startswith(name + ".") for name in ALWAYS_DENSE):
            return False
        for rule in self.ignore:
            plain = rule.removeprefix("model.")
            if rule.startswith("re:"):
                pattern = rule[3:]
                if re.fullmatch(pattern, module_name) or re.fullmatch(pattern, "model." + module_name):
                    return False
            elif module_name == plain or module_name.endswith("." + plain):
                return False
        return True

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A weight [..., N, K] in this scheme's format: (e4m3 weight, fp32 scale)."""
        if self.block_size is None:
            return quantize_weight_per_channel(weight)
        return quantize_weight_blockwise(weight, self.block_size)

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        if self.block_size is None:
            return (out_features, 1)
        return (cdiv(out_features, self.block_size[0]), cdiv(in_features, self.block_size[1]))


SCHEMES: dict[str, QuantScheme] = {
    "fp8": QuantScheme.channel(),
    "fp8-channel": QuantScheme.channel(),
    "fp8-channel-w8a8": QuantScheme.channel(act_quant=True),
    "fp8-block": QuantScheme.block(),
    "fp8-block-w8a8": QuantScheme.block(act_quant=True),
}


def scheme_from_name(name: str) -> QuantScheme:
    """'fp8-channel' | 'fp8-block' (add '-w8a8' for FP8 activations) -> QuantScheme; for quantise-at-load."""
    if name not in SCHEMES:
        raise QuantConfigError(f"unknown quantisation {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def parse_quantization_config(raw: dict[str, Any] | None) -> QuantScheme | None:
    """The scheme of a checkpoint's `quantization_config` (config.json), or None for an unquantised one."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise QuantConfigError(f"quantization_config must be an object; got {raw!r}")
    method = raw.get("quant_method")
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw)
    if method == "fp8":
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantConfigError(f"quantization_config.fmt = {fmt!r}: only e4m3 FP8 weights are supported")
        block = raw.get("weight_block_size")
        if block is not None and (not isinstance(block, list | tuple) or len(block) != 2):
            raise QuantConfigError(f"quantization_config.weight_block_size = {block!r}: expected [rows, cols]")
        ignore = tuple(raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ())
        act = raw.get("activation_scheme", "dynamic") == "dynamic"
        return QuantScheme(tuple(int(b) for b in block) if block else None, act, ignore)
    raise QuantConfigError(f"quantization_config.quant_method = {method!r}: this engine reads FP8 checkpoints in "
                           "'compressed-tensors' (channel-wise) or 'fp8' (block-wise weight_scale_inv) format")


def _parse_compressed_tensors(raw: dict[str, Any]) -> QuantScheme:
    groups = raw.get("config_groups") or {}
    linear_groups = [g for g in groups.values() if "Linear" in (g.get("targets") or ["Linear"])]
    if len(linear_groups) != 1:
        raise QuantConfigError("compressed-tensors quantization_config: expected one config group targeting "
                               f"Linear layers; found {len(linear_groups)}")
    group = linear_groups[0]
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise QuantConfigError(f"compressed-tensors weights {weights!r}: only 8-bit float (FP8 e4m3) weights "
                               "are supported")
    strategy = weights.get("strategy")
    if strategy in ("channel", "tensor"):
        block = None  # a per-tensor scale is widened to one value per channel when loaded
    elif strategy == "block":
        structure = weights.get("block_structure") or [128, 128]
        block = (int(structure[0]), int(structure[1]))
    else:
        raise QuantConfigError(f"compressed-tensors weight strategy {strategy!r}: supported are channel, tensor "
                               "and block")
    activations = group.get("input_activations")
    if activations and (activations.get("type") != "float" or activations.get("num_bits") != 8):
        raise QuantConfigError(f"compressed-tensors input_activations {activations!r}: only FP8 activations")
    return QuantScheme(block, act_quant=bool(activations), ignore=tuple(raw.get("ignore") or ()))


# --- modules ------------------------------------------------------------------------------------------------------
FP8LinearKernel = Callable[..., torch.Tensor]


class FP8Linear(nn.Module):
    """A linear layer with e4m3 weights and fp32 scales; same call as nn.Linear (x [..., K] -> [..., N]).

    `kernel` is `glm_kernels.fp8.fp8_linear_reference` (torch) or `fp8_linear_triton`; `use_kernels` sets it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.act_quant = scheme.block_size, scheme.act_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(scheme.scale_shape(out_features, in_features),
                                                     dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.kernel: FP8LinearKernel = fp8_linear_reference

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> FP8Linear:
        """Quantise a dense nn.Linear (its weights may be on any device; `meta` gives an empty FP8 shell)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                     bias_dtype=weight.dtype, device=weight.device)
        if weight.device.type != "meta":
            q, scale = scheme.quantize(weight.detach())
            module.weight.data, module.weight_scale.data = q, scale
            if linear.bias is not None:
                module.bias.data = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.weight_scale, self.bias, self.block_size, self.act_quant)

    def extra_repr(self) -> str:
        scales = "channel" if self.block_size is None else f"block {self.block_size[0]}x{self.block_size[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 e4m3 ({scales} scales), activations={'fp8 per token' if self.act_quant else 'unquantised'}")


class FP8Experts(nn.Module):
    """The routed experts in FP8, stacked like `model.Experts`: gate_up_proj [E, 2I, D], down_proj [E, D, I].

    Scales: channel-wise gate_up_proj_scale [E, 2I, 1], down_proj_scale [E, D, 1]; block-wise (bn x bk)
    gate_up_proj_scale [E, 2 ceil(I/bn), ceil(D/bk)] (the gate's block rows, then the up's: checkpoints
    quantise gate_proj and up_proj separately) and down_proj_scale [E, ceil(D/bn), ceil(I/bk)].
    """

    def __init__(self, num_experts: int, hidden: int, width: int, scheme: QuantScheme,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.block_size, self.act_quant = scheme.block_size, scheme.act_quant
        gate_rows = scheme.scale_shape(width, hidden)
        down_rows = scheme.scale_shape(hidden, width)

        def param(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.gate_up_proj = param(num_experts, 2 * width, hidden, dtype=FP8_DTYPE)
        self.gate_up_proj_scale = param(num_experts, 2 * gate_rows[0], gate_rows[1], dtype=torch.float32)
        self.down_proj = param(num_experts, hidden, width, dtype=FP8_DTYPE)
        self.down_proj_scale = param(num_experts, *down_rows, dtype=torch.float32)

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: QuantScheme) -> FP8Experts:
        """Quantise a dense `model.Experts` (meta gives an empty FP8 shell)."""
        gate_up, down = experts.gate_up_proj, experts.down_proj
        num, hidden, width = gate_up.shape[0], gate_up.shape[2], down.shape[2]
        module = cls(num, hidden, width, scheme, device=gate_up.device)
        if gate_up.device.type != "meta":
            module.load_dense(gate_up.detach(), down.detach())
        return module

    @torch.no_grad()
    def load_dense(self, gate_up: torch.Tensor, down: torch.Tensor, experts: slice = slice(None)) -> None:
        """Quantise dense expert weights (all experts, or the `experts` slice of them) into this module."""
        scheme = QuantScheme(self.block_size, self.act_quant)
        width = gate_up.shape[1] // 2
        gate_q, gate_s = scheme.quantize(gate_up[:, :width])
        up_q, up_s = scheme.quantize(gate_up[:, width:])
        self.gate_up_proj[experts] = torch.cat((gate_q, up_q), dim=1).to(self.gate_up_proj.device)
        self.gate_up_proj_scale[experts] = torch.cat((gate_s, up_s), dim=1).to(self.gate_up_proj_scale.device)
        down_q, down_s = scheme.quantize(down)
        self.down_proj[experts] = down_q.to(self.down_proj.device)
        self.down_proj_scale[experts] = down_s.to(self.down_proj_scale.device)

    def forward(self, x, topk_ids, topk_weights, ops) -> torch.Tensor:
        return ops.fused_moe(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights,
                             w_gate_up_scale=self.gate_up_proj_scale, w_down_scale=self.down_proj_scale,
                             block_size=self.block_size, act_quant=self.act_quant)


# --- whole models -------------------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Swap the quantisable linears for FP8Linear and the routed experts for FP8Experts, in place.

    On a model with weights, the weights are quantised (quantise-at-load for a model that fits in memory in
    its dense dtype); on a model built on `meta`, the FP8 modules are empty shells of the right shapes and
    dtypes, for the loader to fill from an FP8 checkpoint.
    """
    from workbench.engine.model import Experts  # the dense twin this replaces

    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and QUANTIZABLE_LINEAR.search(name) and scheme.quantizes(name):
            replacements.append((name, FP8Linear.from_linear(module, scheme)))
        elif isinstance(module, Experts) and scheme.quantizes(name):
            replacements.append((name, FP8Experts.from_experts(module, scheme)))
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    model.quant_scheme = scheme
    return model


def use_kernels(model: nn.Module, ops_name: str) -> None:
    """Point every FP8Linear at the Triton GEMM ("triton") or the torch reference ("torch"); FP8Experts
    follow the model's KernelOps already (they call ops.fused_moe)."""
    if ops_name == "triton":
        from glm_kernels.fp8 import fp8_linear_triton as kernel
    else:
        kernel = fp8_linear_reference
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.kernel = kernel


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


# --- loading ------------------------------------------------------------------------------------------------------
# Checkpoint names of FP8 scales -> parameter name templates, in the loader's table format (see weights.py):
# (regex, parameter template, where in a stacked expert tensor). `_inv` (block-wise checkpoints) is dropped.
_L = r"model\.layers\.(?P<layer>\d+)\."
FP8_NAME_TABLE: list[tuple[str, str, str | None]] = [
    (_L + r"(?P<mod>self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)\.weight_scale(_inv)?",
     "layers.{layer}.{mod}.weight_scale", None),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.gate_proj\.weight_scale(_inv)?",
     "layers.{layer}.mlp.experts.gate_up_proj_scale", "gate"),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.up_proj\.weight_scale(_inv)?",
     "layers.{layer}.mlp.experts.gate_up_proj_scale", "up"),
    (_L + r"mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight_scale(_inv)?",
     "layers.{layer}.mlp.experts.down_proj_scale", "all"),
]
# Static activation scales of FP8 checkpoints: not used (activations are quantised per token when at all).
UNUSED_CHECKPOINT_TENSORS = re.compile(r"\.(input_scale|input_zero_point|weight_zero_point)$")


def scale_param_name(param: str) -> str:
    """The scale parameter of an FP8 weight parameter: 'x.q_proj.weight' -> 'x.q_proj.weight_scale',
    'x.experts.gate_up_proj' -> 'x.experts.gate_up_proj_scale'."""
    return param + "_scale"


def expand_fp8_load(param: str, source: torch.Tensor, meta: torch.Tensor, target_dtype: torch.dtype,
                    device: torch.device, scheme: QuantScheme | None) -> list[tuple[str, torch.Tensor, torch.dtype]]:
    """What one checkpoint tensor becomes in a (possibly FP8) model: [(parameter, tensor, dtype to store)].

    - an FP8 parameter fed an FP8 tensor, or a scale: stored as it comes (a per-tensor scale is widened to
      one per channel);
    - an FP8 parameter fed a dense tensor: quantised here, on `device` (quantise-at-load), giving the weight and
      its scale;
    - anything else: unchanged (the loader casts it to `target_dtype`).
    """
    if param.endswith("_scale"):
        if source.numel() == 1 and meta.numel() > 1 and meta.shape[-1] == 1:  # per-tensor scale -> per channel
            source = source.reshape(1).expand(meta.shape[-2]).reshape(-1, 1)
        return [(param, source, torch.float32)]
    if meta.dtype != FP8_DTYPE:
        if source.dtype == FP8_DTYPE:
            raise QuantConfigError(f"{param} is FP8 (e4m3) in the checkpoint but config.json has no "
                                   "quantization_config saying how it is scaled; add the checkpoint's one")
        return [(param, source, target_dtype)]
    if source.dtype == FP8_DTYPE:
        return [(param, source, FP8_DTYPE)]
    if scheme is None:
        raise QuantConfigError(f"{param} is FP8 in the model but the checkpoint holds {source.dtype}: give a "
                               "quantisation scheme to quantise it at load time")
    dense = source.to(device=device, dtype=torch.float32)
    if param.endswith("gate_up_proj") and dense.shape[-2] == meta.shape[-2]:  # a fused [.., 2I, D] tensor
        width = dense.shape[-2] // 2
        (gate_q, gate_s), (up_q, up_s) = scheme.quantize(dense[..., :width, :]), scheme.quantize(dense[..., width:, :])
        weight, scale = torch.cat((gate_q, up_q), -2), torch.cat((gate_s, up_s), -2)
    else:
        weight, scale = scheme.quantize(dense)
    return [(param, weight, FP8_DTYPE), (scale_param_name(param), scale, torch.float32)]


# --- saving -------------------------------------------------------------------------------------------------------
def quantization_config(scheme: QuantScheme) -> dict[str, Any]:
    """The config.json `quantization_config` that describes `scheme` (what `parse_quantization_config` reads)."""
    if scheme.block_size is not None:
        return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(scheme.block_size),
                "activation_scheme": "dynamic" if scheme.act_quant else "weight_only",
                "modules_to_not_convert": list(scheme.ignore) or ["lm_head"]}
    group: dict[str, Any] = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                                "dynamic": False, "symmetric": True}}
    if scheme.act_quant:
        group["input_activations"] = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                      "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": group},
            "ignore": list(scheme.ignore) or ["lm_head"]}


def fp8_checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FP8 model's tensors under checkpoint names: experts unstacked, scales as `weight_scale` (channel) or
    `weight_scale_inv` (block), the inverse of what the loader reads."""
    scheme: QuantScheme = model.quant_scheme
    suffix = "weight_scale" if scheme.block_size is None else "weight_scale_inv"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        stacked = re.search(r"experts\.(gate_up_proj|down_proj)(_scale)?$", name)
        if stacked:
            prefix = "model." + name[: stacked.start()] + "experts"
            leaf = suffix if stacked.group(2) else "weight"
            half = tensor.shape[1] // 2
            for expert in range(tensor.shape[0]):
                if stacked.group(1) == "gate_up_proj":
                    out[f"{prefix}.{expert}.gate_proj.{leaf}"] = tensor[expert, :half]
                    out[f"{prefix}.{expert}.up_proj.{leaf}"] = tensor[expert, half:]
                else:
                    out[f"{prefix}.{expert}.down_proj.{leaf}"] = tensor[expert]
        elif name.endswith(".weight_scale"):
            out["model." + name.removesuffix("weight_scale") + suffix] = tensor
        elif name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                out[name] = tensor
        else:
            out["model." + name] = tensor
    return {name: t.detach().contiguous().cpu() for name, t in out.items()}


def save_fp8_checkpoint(model: nn.Module, folder, dtype: torch.dtype | None = None):
    """Write an FP8 model as a checkpoint the engine (and its format's other readers) load: config.json with
    the scheme's quantization_config and one model.safetensors. Dense tensors are cast to `dtype` if given."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model.quant_scheme)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    keep = re.compile(r"(_scale(_inv)?|mlp\.gate\.(weight|e_score_correction_bias))$")
    tensors = {name: t if dtype is None or t.dtype == FP8_DTYPE or keep.search(name) else t.to(dtype)
               for name, t in fp8_checkpoint_state_dict(model).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
