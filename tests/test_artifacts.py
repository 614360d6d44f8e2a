"""Run directories: round trip, hash verification, refusal of tampered or mismatched files."""

import json

import numpy as np
import pytest
import torch

from dundi.errors import DundiError
from dundi.nets.models import build_distance_net, build_native
from dundi.rule.index import OracleIndex
from dundi.rule.params import TwoStepRule
from dundi.run.directory import Run
from dundi.run.storage import load_model, load_oracle, read_meta, save_model, save_oracle

SHAPE = (1, 28, 28)


def _dundi_run(tmp_path, mode="R"):
    native = build_native("lenet5", SHAPE, 10)
    model = build_distance_net("lenet5", SHAPE, 16, pretrained=native if mode == "P" else None)
    meta = {"kind": "dundi", "arch": "lenet5", "dataset": "mnist-10k", "in_shape": list(SHAPE),
            "num_classes": 10, "embed_dim": 16, "mode": mode, "config": {}}
    save_model(tmp_path, model, meta)
    x = torch.rand(30, *SHAPE)
    with torch.no_grad():
        emb = model.eval()(x).numpy()
    save_oracle(tmp_path, OracleIndex(emb, 10, meta={"seed": 0}))
    return model, x


@pytest.mark.parametrize("mode", ["R", "P"])
def test_round_trip_gives_the_same_model_and_predictions(tmp_path, mode):
    model, x = _dundi_run(tmp_path, mode)
    run = Run.load(tmp_path)
    for a, b in zip(model.state_dict().values(), run.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # oracle 0 of class c is the embedding of x[3c]: with n = 1 each such image is its own class
    res = run.classify(x[::3].numpy(), TwoStepRule(1, 1, 10))
    np.testing.assert_array_equal(res.labels, np.arange(10))
    np.testing.assert_allclose(res.nearest_distance, 0, atol=1e-3)


def test_native_round_trip(tmp_path):
    model = build_native("lenet1", SHAPE, 10)
    save_model(tmp_path, model, {"kind": "native", "arch": "lenet1", "in_shape": list(SHAPE), "num_classes": 10})
    loaded, meta = load_model(tmp_path)
    x = torch.rand(4, *SHAPE)
    torch.testing.assert_close(model.eval()(x), loaded(x))
    assert len(meta["files"]["model.safetensors"]) == 64


def test_tampered_weights_are_refused(tmp_path):
    _dundi_run(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DundiError, match="does not match the sha256"):
        load_model(tmp_path)


def test_tampered_index_is_refused(tmp_path):
    _dundi_run(tmp_path)
    with open(tmp_path / "oracle" / "v1" / "index.faiss", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DundiError, match="oracle/v1/index.faiss does not match"):
        Run.load(tmp_path)


def test_index_from_other_weights_is_refused(tmp_path):
    _dundi_run(tmp_path / "a")
    _dundi_run(tmp_path / "b")
    # copy b's oracle into a, and even fix up a's recorded hashes: the weights link still fails
    for name in ("index.faiss", "oracle.json"):
        (tmp_path / "a" / "oracle" / "v1" / name).write_bytes((tmp_path / "b" / "oracle" / "v1" / name).read_bytes())
    meta_a, meta_b = read_meta(tmp_path / "a"), read_meta(tmp_path / "b")
    for name in ("oracle/v1/index.faiss", "oracle/v1/oracle.json"):
        meta_a["files"][name] = meta_b["files"][name]
    (tmp_path / "a" / "run.json").write_text(json.dumps(meta_a))
    with pytest.raises(DundiError, match="built with other weights"):
        load_oracle(tmp_path / "a")


def test_missing_run_and_missing_index_give_clear_errors(tmp_path):
    with pytest.raises(DundiError, match="is not a DunDi run"):
        load_model(tmp_path / "nope")
    model = build_distance_net("lenet5", SHAPE, 16)
    save_model(tmp_path, model, {"kind": "dundi", "arch": "lenet5", "in_shape": list(SHAPE),
                                 "num_classes": 10, "embed_dim": 16, "mode": "R"})
    with pytest.raises(DundiError, match="no oracle index yet"):
        Run.load(tmp_path)


def test_weights_are_safetensors_not_pickle(tmp_path):
    _dundi_run(tmp_path)
    head = (tmp_path / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80")  # a pickle stream starts with the PROTO opcode
    header_len = int.from_bytes(head[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert any(k.startswith("backbone.") for k in header)
