"""A checkpoint is data, never code: the plain-data check on save, the allow-listed header and DCP metadata
loaders, and hand-made pickles that would run code."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.checkpoints import (
    MakesMarkerWhenUnpickled,
    load,
    load_fresh,
    make_optimizer,
    rehash_sidecar,
    save,
    save_trained,
    saved_steps,
    torch_saved,
    warnings_in,
    write_with_matching_sidecar,
)
from train.checkpoint import CheckpointError, plain


def test_allowed_extra_values_load_weights_only(tmp_path: Path) -> None:
    values = {
        "none": None,
        "flag": True,
        "count": 3,
        "ratio": 0.5,
        "name": "x",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "shape": torch.Size([2, 3]),
        "nested": {1: [1, (2, 3.0)], "t": torch.arange(3)},
    }
    model, optimizer = save_trained(tmp_path, [1])
    save(tmp_path, 2, model, optimizer, values)
    step, extra = load(tmp_path, model, optimizer)
    assert step == 2
    assert torch.equal(extra.pop("nested")["t"], torch.arange(3))
    assert extra == {k: v for k, v in values.items() if k != "nested"}


def test_extra_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model, optimizer = save_trained(tmp_path, [1])
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2, model, optimizer, {"data": {"pos": np.int64(3)}})
    message = str(caught.value)
    assert "\n" not in message and "['data']['pos']" in message and "numpy" in message
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]


class KeepsNumpyExtraState(nn.Linear):
    def get_extra_state(self) -> object:
        return np.zeros(2)

    def set_extra_state(self, state: object) -> None:
        pass


def test_model_state_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model = nn.Sequential(KeepsNumpyExtraState(2, 2))
    with pytest.raises(CheckpointError, match=r"\['model'\]\['0\._extra_state'\] is a numpy\.ndarray"):
        save(tmp_path, 1, model, make_optimizer(model), {})
    assert saved_steps(tmp_path) == []


def test_pickle_that_would_run_code_is_refused_and_the_previous_used(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1])
    marker = tmp_path / "code-ran"
    write_with_matching_sidecar(tmp_path, 2, torch_saved({"model": MakesMarkerWhenUnpickled(marker), "step": 2}))
    assert load_fresh(tmp_path) == 1
    assert not marker.exists()
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "not plain data" in line and "refused" in line


HOSTILE_HEADERS = {
    # Issue 10 item 10: hand-made pickles, re-hashed: a global outside the allow-list, plain data of a wrong shape.
    "a non-allow-listed global": pickle.dumps({"format": 2, "step": 2, "parts": collections.Counter("ab")}, protocol=2),
    "a raw pickle of a list": pickle.dumps([1, 2, 3], protocol=2),
    "plain data of the wrong shape": torch_saved({"format": 2, "step": 2, "parts": [], "part_names": "model"}),
    "a header of another step": torch_saved({"format": 2, "step": 1, "parts": {}, "part_names": [], "config": None}),
}


@pytest.mark.parametrize("kind", HOSTILE_HEADERS)
def test_a_hand_made_header_with_a_rehashed_sidecar_is_skipped(tmp_path: Path, caplog, kind: str) -> None:
    save_trained(tmp_path, [1])
    write_with_matching_sidecar(tmp_path, 2, HOSTILE_HEADERS[kind])
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "skipped" in line and "\n" not in line


def test_hand_made_dcp_metadata_with_a_rehashed_sidecar_is_skipped(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1])
    marker = tmp_path / "code-ran"
    write_with_matching_sidecar(tmp_path, 2, (tmp_path / "checkpoints" / "step-000001" / "header.pt").read_bytes())
    (tmp_path / "checkpoints" / "step-000002" / ".metadata").write_bytes(pickle.dumps(MakesMarkerWhenUnpickled(marker)))
    rehash_sidecar(tmp_path, 2)
    assert load_fresh(tmp_path) == 1
    assert not marker.exists()
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "not plain data" in line


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(MakesMarkerWhenUnpickled(marker)))
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        plain.check_dcp_metadata(metadata)
    assert not marker.exists()


def test_dcp_metadata_declaring_pickled_bytes_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(Metadata(state_dict_metadata={"model.w": BytesStorageMetadata()})))
    with pytest.raises(pickle.UnpicklingError, match="other than tensors"):
        plain.check_dcp_metadata(metadata)


def test_metadata_enum_members_pickled_by_getattr_load_but_other_lookups_do_not() -> None:
    """Python 3.11.0-3.11.4 (Debian 12's python3) pickle Enum members as getattr(cls, name)."""
    from torch.distributed.checkpoint.planner import WriteItemType

    class Member:
        def __reduce__(self):
            return (getattr, (WriteItemType, "TENSOR"))

    class Attribute:
        def __reduce__(self):
            return (getattr, (WriteItemType, "__class__"))

    assert plain.MetadataUnpickler(io.BytesIO(pickle.dumps(Member()))).load() is WriteItemType.TENSOR
    with pytest.raises(pickle.UnpicklingError):
        plain.MetadataUnpickler(io.BytesIO(pickle.dumps(Attribute()))).load()
