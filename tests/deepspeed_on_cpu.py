"""Run a training script under accelerate's real DeepSpeed path on CPU processes (gloo), for the tests.

    accelerate launch --config_file <deepspeed config, num_processes 2, mixed_precision no> tests/deepspeed_on_cpu.py \
        train_scripts/train_dit_flow.py --flags ...

On a machine without an accelerator, ``accelerate launch`` with a DeepSpeed config starts the processes with
``ACCELERATE_USE_DEEPSPEED=true``, but accelerate then picks no ``torch.distributed`` backend for them (its backend
choice knows NCCL, XLA, ... and gloo only for ``MULTI_CPU``), and DeepSpeed's batch-size check fails. This shim creates
the process state with gloo first and runs the script as ``__main__``: everything else is accelerate's own DeepSpeed
path (``deepspeed.initialize``, the ZeRO-2 optimizer, ``backward`` stepping the engine, ``save_state`` and
``load_state`` in DeepSpeed's checkpoint format). Not ``ACCELERATE_USE_CPU=1``: with it accelerate drops DeepSpeed and
runs DDP. DeepSpeed's shared-memory CPU op (``deepspeed_shm_comm``) serves only ``inference_all_reduce`` (DeepSpeed's
inference); training's collectives go through ``torch.distributed`` (gloo) with or without it. The shim marks it
unavailable, so that DeepSpeed does not compile it with the machine's C++ compiler at start (46 CPU-seconds measured
on a machine that had not built it before, as every CI machine). What stays GPU-only: NCCL and DeepSpeed's CUDA kernels; the
partitioning of gradients and optimizer states and the checkpoints are the same code.
"""

import runpy
import sys

from accelerate.state import PartialState

from diffusability_hf.errors import import_before_process_group

if __name__ == "__main__":
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed reads the op's availability here
    import_before_process_group()  # as accelerate's own DeepSpeed path imports DeepSpeed before it creates the group
    PartialState(backend="gloo")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
