"""Run a training script under accelerate's real FSDP2 path on CPU processes (gloo), for the tests.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file <fsdp config, num_processes 2> tests/fsdp_on_cpu.py \
        train_scripts/train_dit_flow.py --flags ...

accelerate 1.x selects ``DistributedType.FSDP`` only for accelerator devices: on CPU processes it keeps
``MULTI_CPU`` and ignores the FSDP plugin that ``accelerate launch`` built from the config. This shim changes that one
decision, after accelerate made every other one (the plugin from the config's environment, gloo, the device), then
runs the script as ``__main__``: ``Accelerator.prepare`` then shards the model with ``fully_shard`` (``DTensor``
parameters), and ``save_state``, ``load_state``, ``clip_grad_norm_`` and ``get_state_dict`` take their FSDP2 paths,
as on GPUs. What stays GPU-only: NCCL, CUDA streams and prefetching, and bf16 speed; the sharding, the
collectives and the state dicts are the same code.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
