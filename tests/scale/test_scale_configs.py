"""The Accelerate configs of docs/scale.md load as plain multi-GPU configs (alambic shards by itself)."""

from pathlib import Path

import pytest

ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_multi_gpu_without_fsdp_or_deepspeed(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type) in ("DistributedType.MULTI_GPU", "MULTI_GPU")
    assert not config.fsdp_config and not config.deepspeed_config
    assert config.num_processes == 8 * config.num_machines
