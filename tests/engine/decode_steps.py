"""The step-by-step comparison of a compiled decode step with the torch path, shared by the float and the quantized
decode tests: both engines decode the same greedy sequence, each step from the same cache, and every step's logits
must agree within `tolerance` of their largest value, except at the steps where the router chose other experts."""

from __future__ import annotations

import torch

from workbench.engine.sampling import SamplingParams


def rerouted_decode_steps(compiled, reference, prompt: list[int], steps: int, tolerance: float) -> int:
    """Decode `steps` tokens on both engines (routing on); asserts each step's logits agree and returns how many
    steps the two routers chose differently at (those are not compared)."""
    params = SamplingParams(max_new_tokens=steps + 10, temperature=0.0, stop_token_ids=[])
    ours = compiled.add_request(prompt, params, routing=True)
    theirs = reference.add_request(prompt, params, routing=True)
    compiled.step(), reference.step()  # prefill: the same torch path on both
    rerouted = 0
    for _ in range(steps):
        # Each step starts from the reference's cache, so a difference cannot carry over into later steps.
        for (k, v), (k_ref, v_ref) in zip(compiled.cache.layers, reference.cache.layers, strict=True):
            k.copy_(k_ref), v.copy_(v_ref)
        compiled.scheduler._reserve_decode_slots([ours]), reference.scheduler._reserve_decode_slots([theirs])
        logits = compiled.runner.decode([ours])
        expected = reference.runner.decode([theirs])
        if not torch.equal(ours.routing_chunks[-1][0], theirs.routing_chunks[-1][0]):
            rerouted += 1
        else:
            scale = max(expected.abs().max().item(), 1.0)
            assert (logits - expected).abs().max().item() <= tolerance * scale
        # Both continue from the same token, so one near-tie cannot send them down different paths.
        token = int(expected.argmax())
        for request in (ours, theirs):
            request.num_cached += 1
            request.output_ids.append(token)
    return rerouted
