"""fuse_projections(): q/k/v and gate/up as single GEMMs for inference, invisible to checkpoints and results."""

from __future__ import annotations

import torch

from workbench.engine import GLMConfig
from workbench.engine.model import AttentionBatch
from workbench.engine.quant import FP8Linear, quantize_model, scheme_from_name
from workbench.engine.testing import random_model


def test_fused_model_computes_the_same_and_keeps_its_names_and_storage():
    config = GLMConfig.preset("tiny")
    model = random_model(config, seed=3).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        bytes_before = sum(p.numel() for p in model.parameters())
        model.fuse_projections()
        after = model(ids)
    attention = model.layers[0].self_attn
    assert attention.fused_qkv is not None and model.layers[0].mlp.fused_gate_up is not None
    # The originals are views of the fused matrix: one copy of the weights, same names and values.
    assert attention.q_proj.weight.untyped_storage().data_ptr() == attention.fused_qkv[0].untyped_storage().data_ptr()
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], value) for name, value in state_before.items())
    assert sum(p.numel() for p in model.parameters()) == bytes_before
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_quantised_linears_are_left_to_their_own_kernels():
    config = GLMConfig.preset("tiny")
    model = random_model(config, seed=1).eval()
    quantize_model(model, scheme_from_name("fp8-channel"))
    model.fuse_projections()
    attention = model.layers[0].self_attn
    assert isinstance(attention.q_proj, FP8Linear) and attention.fused_qkv is None
    with torch.no_grad():
        hidden = model.hidden_states(torch.arange(5), AttentionBatch.uniform(1, 5, torch.device("cpu")))
    assert torch.isfinite(hidden).all()


def test_a_fused_model_still_trains_every_projection():
    # Fused matrices are plain tensors autograd does not see: with grad on, the separate GEMMs run instead.
    config = GLMConfig.preset("tiny")
    model = random_model(config, seed=2)
    model.fuse_projections()
    for param in model.parameters():
        param.requires_grad_(True)
    model(torch.arange(6)[None]).sum().backward()
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for param in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight, mlp.gate_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
