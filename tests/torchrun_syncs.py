"""Run by test_parallel.py under torchrun (2 ranks, gloo) with train.py's flags: how often a training
step makes the host wait for the device, under DDP or FSDP2.

On GPUs a step's numbers are reduced over the ranks two ways: the loss sums, still on the device,
with nccl on the device, then read once with the step's .tolist(); and what the host already holds
(token counts, the stop flag) over a gloo group of CPU tensors (parallel.all_reduce_sum), which
waits for the other ranks but never for a GPU. On the CPU both groups are gloo, so this script
tells them apart by group: it counts every read of a value on the loop's thread (test_train's
DeviceSyncs) except reads of tensors that went through the host group, and records any host
reduction that is not one of CPU tensors over a gloo group other than the default one. A read of
a tensor reduced over the default group counts: on GPUs that is an nccl result.

Writes JSON to OUTPUT_DIR/syncs.rank<N>.json: syncs and host reductions per step (over steps 2 to
5: the first step and the last, with its final checkpoint, left out), and the misplaced reductions.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training import parallel
import training.loop
from training.flags import parse_config
from test_train import DeviceSyncs

torch.set_num_threads(1)  # test_train's conftest set more; torchrun gave each rank one thread
cfg = parse_config(sys.argv[1:])
counter, monkeypatch = DeviceSyncs(), pytest.MonkeyPatch()
counter.count_tolist(monkeypatch)
host_reductions, misplaced, at_step = [0], [], []
real_all_reduce, real_train_step = dist.all_reduce, training.loop.train_step


def all_reduce(tensor, *args, group=None, **kwargs):
    if group is not None and group is getattr(parallel, "_host_group", None):
        host_reductions[0] += 1
        tensor.host_only = True  # its values come from the other ranks' hosts, not from a device
        if tensor.device.type != "cpu" or dist.get_backend(group) != "gloo" or group is dist.group.WORLD:
            misplaced.append(f"{tensor.device} over {dist.get_backend(group)}")
    return real_all_reduce(tensor, *args, group=group, **kwargs)


def train_step(*args, **kwargs):
    at_step.append((counter.count, host_reductions[0]))  # before step 1, 2, ...
    return real_train_step(*args, **kwargs)


monkeypatch.setattr(dist, "all_reduce", all_reduce)
monkeypatch.setattr(training.loop, "train_step", train_step)
with counter:
    training.loop.train(cfg)
assert len(at_step) == cfg.max_steps >= 5, at_step
(syncs_2, reductions_2), (syncs_5, reductions_5) = at_step[1], at_step[4]
result = {"syncs_per_step": (syncs_5 - syncs_2) / 3, "host_reductions_per_step": (reductions_5 - reductions_2) / 3,
          "misplaced": misplaced}
(Path(cfg.output_dir) / f"syncs.rank{os.environ['RANK']}.json").write_text(json.dumps(result))
