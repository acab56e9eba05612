"""Sharded versions of the ops against one device, on 8 CPU devices (`tests/sharded_worker.py`
runs in its own process, since the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharded_worker.py")
# float32 results through sums over a few hundred terms: 1e-5 relative leaves a 10x margin over
# the float32 rounding of such sums
RTOL = 1e-5


def run_worker(check: str) -> dict:
    """The JSON a worker check prints."""
    proc = subprocess.run([sys.executable, str(WORKER), check], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lightning():
    return run_worker("lightning")


SEQUENCE_MESHES = ["sequence8", "data2xsequence4", "sequence8-zigzag", "data2xsequence4-zigzag"]


@pytest.mark.parametrize("mesh", SEQUENCE_MESHES)
def test_lightning_over_the_sequence_axis_equals_one_device(lightning, mesh):
    """LASP+: output, final state and gradients equal the one-device op, documents starting inside
    shards and on a shard boundary; in the contiguous and in the zigzag token order."""
    result = lightning[mesh]
    assert result["o"] < RTOL and result["state"] < RTOL and result["grads"] < RTOL, result


@pytest.mark.parametrize("mesh", SEQUENCE_MESHES)
def test_lightning_over_the_sequence_axis_gathers_only_states(lightning, mesh):
    """The only all-gathers are of per-chunk states, decays and boundary ids: at most
    chunks x B x H x D x D elements (B 2, H 2, D 16; one chunk per shard, two in zigzag order),
    never a token-length array (T 128)."""
    shards = int(re.search(r"sequence(\d+)", mesh).group(1)) * (2 if "zigzag" in mesh else 1)
    gathers = lightning[mesh]["all_gathers"]
    assert gathers, "no all-gather in the compiled op"
    for shape in gathers:
        dims = [int(x) for x in re.search(r"\[([0-9,]*)\]", shape).group(1).split(",") if x]
        assert math.prod(dims) <= shards * 2 * 2 * 16 * 16 and 128 not in dims, shape


@pytest.fixture(scope="module")
def softmax():
    return run_worker("softmax")


@pytest.mark.parametrize("mesh", SEQUENCE_MESHES)
def test_ring_attention_equals_one_device(softmax, mesh):
    """Ring attention over the sequence axis: output and gradients equal the one-device op (GQA,
    documents across shard edges), and the keys travel by collective-permute, never gathered."""
    result = softmax[mesh]
    assert result["o"] < RTOL and result["grads"] < RTOL, result
    assert result["permutes"] > 0 and result["all_gathers"] == [], result


@pytest.fixture(scope="module")
def loss():
    return run_worker("loss")


@pytest.mark.parametrize("mesh", ["sequence8", "data2xsequence4"])
def test_chunked_loss_over_the_sequence_axis_stays_on_each_devices_tokens(loss, mesh):
    """The chunked cross-entropy on a sequence mesh: value and gradients equal one device's, and
    it gathers nothing (each device scores its own tokens; a block scan over the whole row
    would gather the hidden states `[B, T, D]`)."""
    result = loss[mesh]
    assert result["value"] < RTOL and result["grads"] < RTOL, result
    assert result["all_gathers"] == [], result


@pytest.fixture(scope="module")
def model():
    return run_worker("model")


@pytest.mark.parametrize("mesh", ["sequence8", "data2xsequence4"])
def test_model_over_the_sequence_axis_equals_one_device(model, mesh):
    """The tiny model's logits and parameter gradients on a sequence mesh equal one device's, and
    the compiled step gathers no token-length array of hidden states, queries, keys, values or
    expert activations (widths 16 and up: head dim 16, hidden 64). What it still gathers over
    the tokens: the layout's ids `[B, T]` and the router's probabilities `[B, T, E]` (E = 4)."""
    result = model[mesh]
    assert result["logits"] < RTOL and result["grads"] < RTOL, result
    for shape in result["all_gathers"]:
        dims = [int(x) for x in re.search(r"\[([0-9,]*)\]", shape).group(1).split(",") if x]
        assert 128 not in dims or dims[-1] < 16 or shape.startswith(("s32", "pred")), shape


@pytest.fixture(scope="module")
def experts():
    return run_worker("experts")


@pytest.mark.parametrize("mesh", ["data2xtensor2xexpert2", "expert2xsequence4", "fsdp4xexpert2"])
def test_model_with_experts_split_equals_one_device(experts, mesh):
    """Expert parallelism: the experts split over the expert axis, tokens sent to them and back by
    all-to-all; logits and parameter gradients equal one device's. With a tensor axis the experts'
    FFN width is split over it too (expert tensor parallelism): no expert weight (hidden 64 by
    width 96) is ever gathered."""
    result = experts[mesh]
    assert result["logits"] < RTOL and result["grads"] < RTOL, result
    assert result["all_to_alls"] > 0, result
    if "tensor" in mesh:
        expert_weights = [s for s in result["all_gathers"] if re.search(r"\[\d+,(64,96|96,64)\]", s)]
        assert not expert_weights, result["all_gathers"]


def test_a_mesh_axis_that_does_not_divide_a_parameter_is_an_error():
    """tensor 8 over the tiny model's 4 heads: an error naming the parameter, the dimension and
    the axis, rather than a silent replication."""
    error = run_worker("indivisible")["error"]
    assert error is not None and re.search(
        r"parameter blocks\.layers\.0\.\S+: its heads dimension \(4\) cannot be split 8 ways over mesh axes "
        r"\['tensor'\]", error), error
