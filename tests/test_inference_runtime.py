"""fcn_core.inference.runtime: threads, devices, bf16 choice, class ids."""
import pytest
import torch

from fcn_core.inference.runtime import class_ids, inference_bf16, intra_op_threads, resolve_device


def test_num_threads_is_scoped():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with intra_op_threads(0):
            pass


def test_class_ids_are_argmax_with_the_first_maximum_on_ties():
    logits = torch.randn(4, 5, 7, 9)
    logits[:, 3] = logits[:, 1]  # exact ties between classes 1 and 3
    torch.testing.assert_close(class_ids(logits), logits.argmax(1))


def test_bf16_is_as_asked_and_on_by_default_on_cuda():
    assert inference_bf16(torch.device("cpu"), False) is False
    assert inference_bf16(torch.device("cpu"), True) is True
    assert inference_bf16(torch.device("cuda"), None) is True
    assert resolve_device("cpu") == torch.device("cpu")


def test_mirror_maps_flips_each_maps_own_corner_and_leaves_the_padding():
    from fcn_core.inference.runtime import mirror_maps

    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    sizes = [(2, 3), (4, 5)]
    out = mirror_maps(t, sizes)
    assert torch.equal(out[0, :, :2, :3], t[0, :, :2, :3].flip(-1))
    assert torch.equal(out[0, :, 2:, :], t[0, :, 2:, :]) and torch.equal(out[0, :, :, 3:], t[0, :, :, 3:])
    assert torch.equal(out[1], t[1].flip(-1))
    assert torch.equal(mirror_maps(out, sizes), t)  # its own inverse
    assert torch.equal(t, torch.arange(120, dtype=torch.float32).reshape(2, 3, 4, 5))  # input untouched
