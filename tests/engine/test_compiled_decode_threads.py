"""The compiled CPU decode step gives the same logits at any thread count, bit for bit.

Its kernels share chunks of output rows (and attention heads, and routed experts' row chunks) over simd.h's
thread pool, each output computed whole by whichever thread claims its chunk, so no sum is split across threads
and no fp32 addition changes order: a 2-thread step must equal the 1-thread step exactly (`torch.equal`), in every
weight format, for one sequence and for a batch of them, on every instruction-set path.

The model is wider than the other decode tests' (hidden 512, vocab 8192): the pool runs a job inline when it is a
single chunk (~128 KB of weights), and here the lm_head, the attention and MLP projections, the experts' row
chunks and the attention heads of a batch all make several chunks, so two threads really share them.
"""

from __future__ import annotations

import pytest
import torch
from glm_kernels import cpu_compiled
from glm_kernels.quant_linear import set_isa

from workbench.engine import Engine, GLMConfig
from workbench.engine.sampling import SamplingParams
from workbench.engine.testing import write_tiny_checkpoint

CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
              head_dim=64, moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2)
# (dtype, quantize): the float paths (gemv_rows) and both integer formats (int8 lm_head under int4 too)
FORMATS = [("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int4")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("wide"), GLMConfig.preset("tiny", **CONFIG), seed=3)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _steps_at_one_and_two_threads(engine, prompts: list[list[int]], steps: int, set_threads) -> int:
    """Prefills the prompts, then decodes `steps` tokens of all of them together; each step runs at 1 thread and
    again at 2 from the same cache (a step rewrites the same cache slots with the same values) and must give the
    same logits and routing. Returns how many logits were compared."""
    params = SamplingParams(max_new_tokens=steps + 4, temperature=0.0, stop_token_ids=[])
    requests = [engine.add_request(p, params, routing=True) for p in prompts]
    engine.step()  # prefill
    compared = 0
    for _ in range(steps):
        engine.scheduler._reserve_decode_slots(requests)
        logits = {}
        for count in (1, 2):
            set_threads(count)
            for request in requests:
                request.routing_chunks.clear()
            logits[count] = engine.runner.decode(requests)
            logits[count, "ids"] = [r.routing_chunks[-1][0].clone() for r in requests]
        assert torch.equal(logits[1], logits[2]), (logits[1] - logits[2]).abs().max()
        assert all(torch.equal(a, b) for a, b in zip(logits[1, "ids"], logits[2, "ids"], strict=True))
        compared += logits[1].numel()
        for request, token in zip(requests, logits[1].argmax(-1).tolist(), strict=True):
            request.num_cached += 1
            request.output_ids.append(token)
    return compared


@pytest.mark.parametrize("dtype, quantize", FORMATS, ids=[q or d for d, q in FORMATS])
@pytest.mark.parametrize("batch", [1, 3])
def test_two_threads_give_the_one_thread_logits_bitwise(checkpoint, dtype, quantize, batch, threads):
    engine = Engine.from_pretrained(checkpoint, dtype=dtype, kernels="torch", block_size=4, cache_tokens=512,
                                    quantize=quantize)
    assert engine.compiled_decode is not None
    generator = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 4000, (length,), generator=generator).tolist() for length in (37, 5, 70)[:batch]]
    assert _steps_at_one_and_two_threads(engine, prompts, 4, threads) == 4 * batch * CONFIG["vocab_size"]


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_two_threads_give_the_one_thread_logits_on_each_instruction_set(checkpoint, isa, threads):
    engine = Engine.from_pretrained(checkpoint, dtype="float32", kernels="torch", block_size=4, cache_tokens=512,
                                    quantize="int4")
    module = cpu_compiled.load()
    if isa == "avx2" and module.best_isa() == "scalar":
        pytest.skip("this machine's build has no AVX2 path")
    set_isa(isa)
    try:
        _steps_at_one_and_two_threads(engine, [[5, 6, 7] * 9, list(range(100, 140))], 3, threads)
    finally:
        set_isa(None)
