"""Tests of device choice, mixed precision and device descriptions."""

from __future__ import annotations

import pytest
import torch

from AnatSSLLib.device import autocast, autocast_dtype, describe_device, is_out_of_memory, resolve_device
from AnatSSLLib.errors import InputError

HAS_CUDA = torch.cuda.is_available()


def test_resolve_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if HAS_CUDA else "cpu"
    for choice in ("auto", "", None):
        assert resolve_device(choice).type == expected


@pytest.mark.parametrize("choice", ["tpu", "cuda:x", "gpu0", "cuda:-1", "mps"])
def test_unknown_choice_names_the_options(choice):
    with pytest.raises(InputError, match=rf"device '{choice}': expected one of auto, cpu, cuda, cuda:N, gpu"):
        resolve_device(choice)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given when CUDA is missing")
@pytest.mark.parametrize("choice", ["cuda", "gpu", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(choice):
    with pytest.raises(InputError, match=rf"device '{choice}': CUDA was asked for, but .*; use --device cpu"):
        resolve_device(choice)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_choices_on_gpu():
    assert resolve_device("gpu") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    n = torch.cuda.device_count()
    with pytest.raises(InputError, match=f"expected a CUDA index from 0 to {n - 1}"):
        resolve_device(f"cuda:{n}")
    dev = torch.device("cuda", 0)
    a = torch.randn(64, 64, device=dev)
    with autocast(dev):
        assert (a @ a).dtype in (torch.bfloat16, torch.float16)
    with autocast(dev, enabled=False):
        assert (a @ a).dtype == torch.float32
    assert "GB (cuda:0)" in describe_device(dev)


def test_autocast_is_a_no_op_on_cpu():
    a = torch.randn(8, 8)
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    assert autocast_dtype("cpu") is None
    with autocast("cpu"):
        assert (a @ a).dtype == torch.float32
        y = conv(x)
    assert y.dtype == torch.float32 and torch.equal(y, conv(x))


def test_describe_cpu():
    text = describe_device("cpu")
    assert text == f"CPU ({torch.get_num_threads()} threads)"


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("boom"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
