"""utils.py: architecture detection, peak FLOPs, environment, the consumer-Blackwell patch."""

import os

import pytest

import utils


@pytest.mark.parametrize("capability,arch", [((8, 0), "ampere"), ((8, 6), "ampere"),
                                             ((8, 9), "ada"), ((9, 0), "hopper"),
                                             ((10, 0), "blackwell"),
                                             ((12, 0), "blackwell_consumer"),
                                             ((7, 5), "older")])
def test_arch_from_capability(capability, arch):
    assert utils.arch_from_capability(*capability) == arch


def test_peak_tflops_prefers_the_specific_name():
    assert utils.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert utils.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert utils.peak_tflops_for("NVIDIA GeForce RTX 4090") == 165.2
    assert utils.peak_tflops_for("Mystery Accelerator") is None


def test_cpu_device_and_missing_gpu(monkeypatch):
    assert utils.detect_device("cpu").kind == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(utils.ConfigError, match="asks for a CUDA GPU .training_config.device "
                                                "'cuda'. and none was found: add --device cpu"):
        utils.detect_device("cuda")


def test_setup_environment_keeps_user_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    utils.setup_environment(tmp_path)
    assert os.environ["TRITON_CACHE_DIR"] == "/mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


class FakeDriverUtils:
    def get_device_properties(self, index):
        return {"max_shared_mem": 232448, "multiprocessor_count": 170}


def test_consumer_blackwell_gets_its_real_shared_memory_limit():
    rtx = utils.DeviceInfo("cuda", "RTX 5090", "blackwell_consumer", (12, 0), 101376,
                           209.5)
    driver_utils = FakeDriverUtils()
    assert utils.patch_triton_shared_memory(rtx, driver_utils)
    assert driver_utils.get_device_properties(0) == {"max_shared_mem": 101376,
                                                     "multiprocessor_count": 170}
    h100 = utils.DeviceInfo("cuda", "H100", "hopper", (9, 0), 232448, 989.0)
    untouched = FakeDriverUtils()
    assert not utils.patch_triton_shared_memory(h100, untouched)
    assert untouched.get_device_properties(0)["max_shared_mem"] == 232448
