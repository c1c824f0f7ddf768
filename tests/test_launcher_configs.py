"""Every accelerate launcher config in accelerate/ loads the way `accelerate launch` loads it.

``load_config_from_file`` rejects unknown top-level keys and unknown distributed types; the
launcher's own validation (``_validate_launch_command``, accelerate 1.15, pinned) then decides
how many processes start, and for FSDP the plugin is built from the environment the launcher
would export, so a misspelt ``fsdp_config`` key or value fails here too. That cpu-2proc.yaml
really starts two ranks is checked in tests/stages/test_cache_tokens.py.
"""

import warnings

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from helpers import REPO

CONFIGS = REPO / "accelerate"
EXPECTED = {  # file: (distributed_type, processes over all machines, machines)
    "cpu-2proc.yaml": (DistributedType.MULTI_GPU, 2, 1),
    "multi-gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1),
    "multi-node.yaml": (DistributedType.MULTI_GPU, 16, 2),
}


def launcher_args(name: str):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "stages.cache_tokens"])
    return _validate_launch_command(args)[0]


def test_the_folder_holds_exactly_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_the_keys_accelerate_needs(name):
    config = load_config_from_file(str(CONFIGS / name))
    distributed_type, processes, machines = EXPECTED[name]
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == (
        distributed_type,
        processes,
        machines,
    )
    assert config.mixed_precision == "no"  # precision is a stage param (params.yaml), never the launcher's
    assert config.use_cpu is (name == "cpu-2proc.yaml")
    args = launcher_args(name)
    # Several processes start only through the multi-GPU (torchrun) launcher; MULTI_CPU starts one.
    assert (args.multi_gpu or args.use_fsdp) and not args.cpu and args.num_processes == processes
    if machines > 1:
        assert config.main_process_ip and config.main_process_port and processes % machines == 0


def test_fsdp_config_builds_the_plugin(monkeypatch):
    # The launcher copies fsdp_config keys onto its options without complaint: check the names here.
    options = vars(launch_command_parser().parse_args(["x.py"]))
    config = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert set(config.fsdp_config) <= set(options), set(config.fsdp_config) - set(options)
    args = launcher_args("fsdp.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "port 29500 in use" when another run holds it
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    # the block classes of both families exist under these names, so the auto-wrap finds them
    from models import transformer_blocks

    assert plugin.transformer_cls_names_to_wrap == ["TransformerBlock", "AdaLNBlock"]
    assert all(hasattr(transformer_blocks, name) for name in plugin.transformer_cls_names_to_wrap)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
