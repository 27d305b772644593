"""The patch's encodings (patch.py): where changed entries are, as int32 positions or a bit mask, whichever is
smaller; both rebuild the hardened state bit for bit, older patches still read, damage is one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save
from torch import nn

from advtune.errors import AdvtuneError
from advtune.patch import apply_to_state, make_patch, merged_weight, pack_bits, read_patch, unpack_bits, write_patch


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1003])
def test_bits_pack_and_unpack_to_the_same_mask(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(packed, n), mask)
    assert pack_bits(torch.tensor([True] + [False] * 7)).item() == 1  # the first entry is the lowest bit


def _pair(share: float, shape=(64, 64, 3, 3)):
    torch.manual_seed(0)
    base = nn.Conv2d(shape[1], shape[0], shape[2], bias=False)
    tuned = nn.Conv2d(shape[1], shape[0], shape[2], bias=False)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        change = torch.rand(tuned.weight.shape, generator=torch.Generator().manual_seed(1)) < share
        tuned.weight[change] += 0.01
    return base, tuned


@pytest.mark.parametrize("share, part, most_bytes", [(0.001, "index", 0.02), (0.1, "mask", 0.14), (0.99, "full", 1.0)])
def test_each_share_of_change_is_stored_in_its_smallest_form_and_rebuilds_bit_for_bit(
    tmp_path, share, part, most_bytes
):
    base, tuned = _pair(share)
    tensors, meta = make_patch(base, tuned)
    assert {k.rpartition("::")[2] for k in tensors} == ({"full"} if part == "full" else {part, "value"})
    assert sum(t.nbytes for t in tensors.values()) <= most_bytes * tuned.weight.nbytes
    if part == "index":
        assert tensors["weight::index"].dtype == torch.int32
    assert meta["version"] == ("3" if part == "mask" else "1")  # the lowest version that reads it
    assert int(meta["stored_entries"]) == (tuned.weight.numel() if part == "full" else int(meta["changed_entries"]))
    write_patch(tmp_path / "p.safetensors", base, tuned)
    rebuilt = apply_to_state(base.state_dict(), tmp_path / "p.safetensors")
    assert torch.equal(rebuilt["weight"], tuned.weight) and not torch.equal(rebuilt["weight"], base.weight)


def test_a_version_1_patch_with_int64_positions_still_reads(tmp_path):
    base, tuned = _pair(0.001)
    tensors, meta = make_patch(base, tuned)
    tensors["weight::index"] = tensors["weight::index"].long()  # how patches were written before
    (tmp_path / "old.safetensors").write_bytes(save(tensors, metadata=meta))
    assert torch.equal(apply_to_state(base.state_dict(), tmp_path / "old.safetensors")["weight"], tuned.weight)


def test_a_mask_that_does_not_fit_its_values_is_refused_in_one_line(tmp_path):
    base, tuned = _pair(0.1)
    tensors, meta = make_patch(base, tuned)
    tensors["weight::mask"] = tensors["weight::mask"].clone()
    tensors["weight::mask"][0] ^= 1  # one entry more or fewer than the values say
    (tmp_path / "bad.safetensors").write_bytes(save(tensors, metadata=meta))
    with pytest.raises(AdvtuneError, match="the change mask of 'weight' does not fit its values"):
        apply_to_state(base.state_dict(), tmp_path / "bad.safetensors")
    tensors["weight::mask"] = tensors["weight::mask"][:-1]
    (tmp_path / "short.safetensors").write_bytes(save(tensors, metadata=meta))
    with pytest.raises(AdvtuneError, match="the change mask of 'weight' does not fit this model"):
        apply_to_state(base.state_dict(), tmp_path / "short.safetensors")
    assert read_patch(tmp_path / "short.safetensors")[1]["version"] == "3"


@pytest.mark.parametrize("share", [0.001, 0.1])
def test_values_of_another_shape_are_refused_in_one_line_not_a_traceback(tmp_path, share):
    base, tuned = _pair(share)
    tensors, meta = make_patch(base, tuned)
    tensors["weight::value"] = tensors["weight::value"][:, None]  # the right count, the wrong shape: the hash judges
    (tmp_path / "ok.safetensors").write_bytes(save(tensors, metadata=meta))
    assert torch.equal(apply_to_state(base.state_dict(), tmp_path / "ok.safetensors")["weight"], tuned.weight)
    tensors["weight::value"] = tensors["weight::value"].flip(0)  # the right shape, the entries out of order
    (tmp_path / "bad.safetensors").write_bytes(save(tensors, metadata=meta))
    with pytest.raises(AdvtuneError, match="did not give the recorded result"):
        apply_to_state(base.state_dict(), tmp_path / "bad.safetensors")


def test_a_patch_with_a_mask_and_low_rank_factors_is_version_3_and_rebuilds(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 8, bias=False))
    tuned = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 8, bias=False))
    tuned.load_state_dict(base.state_dict())
    up, down = torch.randn(64, 2), torch.randn(2, 64)
    with torch.no_grad():
        tuned[0].weight.copy_(merged_weight(base[0].weight, up, down))
        tuned[1].weight[:, ::4] += 0.01  # a quarter of the entries: a mask
    tensors, meta = make_patch(base, tuned, factors={"0.weight": (up, down)})
    assert {"0.weight::up", "0.weight::down", "1.weight::mask", "1.weight::value"} == set(tensors)
    assert meta["version"] == "3"
    write_patch(tmp_path / "p.safetensors", base, tuned, factors={"0.weight": (up, down)})
    rebuilt = apply_to_state(base.state_dict(), tmp_path / "p.safetensors")
    assert all(torch.equal(rebuilt[k], v) for k, v in tuned.state_dict().items())
