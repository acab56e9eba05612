"""Sharded versions of the ops, loading a model onto a mesh and the serving engine on it against
one device, on 8 CPU devices (`tests/sharded_worker.py` runs in its own process, since the device
count is fixed when JAX starts); serve.py's --mesh flag."""

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


@pytest.fixture(scope="module")
def load_and_serve():
    return run_worker("load_and_serve")


@pytest.mark.parametrize("source", ["orbax", "hf", "orbax-int8", "hf-int8", "vl"])
def test_load_model_onto_a_mesh_places_each_param_in_its_shards(load_and_serve, source):
    """`load_model(..., mesh=data2 x tensor2 x expert2)` from our checkpoint, an HF directory
    (both also quantized to int8 as they load) and of a VL model: every param has the sharding
    `param_shardings` gives it and each of the 8 devices holds exactly its shard (more than half
    of the params split: experts, vocabulary, heads, FFN width; with int8 the quantized weights'
    scales too), and the logits equal those of the same load on one device."""
    result = load_and_serve["load"][source]
    assert result["misplaced"] == [], result
    assert result["split"] > result["params"] // 2, result
    assert (result["split_scales"] > 0) == ("int8" in source), result
    assert result["logits"] < RTOL, result


def test_the_engine_on_a_mesh_generates_the_one_device_tokens(load_and_serve):
    """The serving engine on a model loaded onto data2 x tensor2 x expert2: the greedy tokens of
    two prompts of different lengths (one and two prefill chunks, then one dispatch of 8 decode
    steps) equal the one-device engine's; its cache stays placed as `cache_shardings` says, the
    lightning states split over the rows (data x expert) and heads (tensor), the K/V pages'
    heads over tensor."""
    served = load_and_serve["serve"]
    assert served["mesh_finish"] == served["one_finish"] == [["length", None]] * 2, served
    assert served["tokens"]["mesh"] == served["tokens"]["one"], served
    assert all(len(t) == 9 for t in served["tokens"]["one"]), served
    assert served["cache_placed"], served
    blocks, layers, rows, heads, k, _ = served["lightning_state"]
    assert served["lightning_state_shard"] == [blocks, layers, rows // 4, heads // 2, k, k], served
    assert served["key_shard"] == [*served["key"][:4], served["key"][4] // 2, served["key"][5]], served


def test_serve_mesh_errors_on_eight_devices(load_and_serve):
    """serve.py --mesh on 8 devices: sizes that do not multiply to the device count, a
    --max-batch the expert axis cannot split and a sequence axis (a decode step's one token per
    slot cannot be split) each exit with status 1 and one line naming the problem."""
    result = load_and_serve["serve"]["cli"]
    bad = result["bad_size"]
    assert bad["code"] == 1 and re.fullmatch(r"error: mesh \{.*'data': 3.*\} has 6 devices but 8 are visible\n",
                                             bad["stderr"]), bad
    batch = result["bad_batch"]
    assert batch["code"] == 1 and re.fullmatch(r"error: max_batch \(6\) must be a multiple of 4 on mesh .*\n",
                                               batch["stderr"]), batch
    sequence = result["sequence"]
    assert sequence["code"] == 1 and re.fullmatch(r"error: mesh \{.*'sequence': 2\} splits the sequence axis, "
                                                  r"which serving cannot: .*\n", sequence["stderr"]), sequence


@pytest.mark.parametrize("value, message", [
    ("data=2,tensor=2,expert=2", None),
    ("fsdp=-1,tensor=2", None),
    ("data=2,model=2", r"unknown mesh axis 'model'"),
    ("data=two", r"mesh axis data='two': the size must be a positive integer"),
    ("data=0", r"mesh axis data=0: the size must be a positive integer"),
    ("data", r"override 'data' is not of the form key=value"),
    ("", r"no mesh axes"),
])
def test_serve_mesh_flag_parsing(value, message, capsys):
    """--mesh AXIS=N,... parses into the sizes train.py's `mesh.AXIS=N` overrides give; an
    unknown axis, a size that is not a positive integer or -1, or no `=` is a usage error
    (exit status 2) naming it."""
    from minimax_jax.serving.cli import parse_args

    if message is None:
        want = dict(item.split("=") for item in value.split(","))
        assert parse_args(["--mesh", value]).mesh == {a: int(n) for a, n in want.items()}
        return
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--mesh", value])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
