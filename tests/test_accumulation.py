"""Gradient accumulation (--accumulation_steps): the accumulated update, optimizer-step counting and DDP syncs."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from engine import train_one_epoch
from models import build_model
from tests.model_utils import random_targets, tiny_args
from util.misc import nested_tensor_from_tensor_list

# Denoising on, but without label or box noise: the random draws of a batch of 2 and of two batches of 1
# differ in order, and noise would make the two runs see different denoising queries.
NOISELESS_DN = ("--use_dn", "--label_noise_scale", "0", "--box_noise_scale", "0")


pytestmark = pytest.mark.usefixtures("single_thread")


def two_images(box_counts):
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 96, 128, generator=generator) for _ in box_counts]  # equal sizes: no padding
    return images, random_targets(box_counts, generator=generator)


def update_of(model, criterion, loader, accumulation_steps):
    """Parameter change after one epoch over ``loader`` with plain SGD at lr 1 (the change is minus the
    gradient; AdamW would divide by the gradient's magnitude and blow up rounding differences of tiny
    entries), and the number of optimizer steps taken."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stats = train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=0, max_norm=0,
                            accumulation_steps=accumulation_steps)
    return [p.detach() - b for p, b in zip(model.parameters(), before)], stats["optimizer_steps"]


def largest_difference(update, other):
    scale = max(u.abs().max().item() for u in update)
    return max((u - o).abs().max().item() for u, o in zip(update, other)) / scale


@pytest.mark.parametrize("modelname", ["dn_dab_detr", "dn_dab_deformable_detr"])
def test_two_accumulated_batches_of_one_make_the_update_of_one_batch_of_two(modelname):
    """Each micro-batch normalises its losses by its own box count (and its denoising losses by its own
    denoising-query count); the accumulated gradient is the mean over the micro-batches. With the same
    box count in every image (and equal image sizes, so no padding, and noiseless denoising), those
    normalisers are exactly half the batch's, and the mean of the two halves is the batch's gradient."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(modelname, *NOISELESS_DN))
    images, targets = two_images([3, 3])
    batch_of_two = [(nested_tensor_from_tensor_list(images), targets)]
    batches_of_one = [(nested_tensor_from_tensor_list([image]), [target]) for image, target in zip(images, targets)]

    reference, reference_steps = update_of(model, criterion, batch_of_two, accumulation_steps=1)
    accumulated, accumulated_steps = update_of(model, criterion, batches_of_one, accumulation_steps=2)
    assert reference_steps == accumulated_steps == 1
    assert largest_difference(reference, accumulated) < 1e-5

    # Without accumulation the two batches of one are two steps, the second from other weights.
    stepped, steps = update_of(model, criterion, batches_of_one, accumulation_steps=1)
    assert steps == 2 and largest_difference(reference, stepped) > 1e-2


def test_with_unequal_box_counts_accumulation_weighs_boxes_differently():
    """The documented difference: with 1 and 5 boxes, the batch of two gives each box weight 1/6, the
    accumulated micro-batches give the lone box 1/2 and the others 1/10 each."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("dn_dab_detr", *NOISELESS_DN))
    images, targets = two_images([1, 5])
    batch_of_two = [(nested_tensor_from_tensor_list(images), targets)]
    batches_of_one = [(nested_tensor_from_tensor_list([image]), [target]) for image, target in zip(images, targets)]
    reference, _ = update_of(model, criterion, batch_of_two, accumulation_steps=1)
    accumulated, _ = update_of(model, criterion, batches_of_one, accumulation_steps=2)
    assert largest_difference(reference, accumulated) > 1e-3


def test_an_incomplete_last_group_steps_with_what_it_has():
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("dn_dab_detr", *NOISELESS_DN))
    images, targets = two_images([2, 2, 2])
    batches = [(nested_tensor_from_tensor_list([image]), [target]) for image, target in zip(images, targets)]
    _, steps = update_of(model, criterion, batches, accumulation_steps=2)
    assert steps == 2  # micro-batches 0+1, then 2 alone
    _, steps = update_of(model, criterion, batches, accumulation_steps=3)
    assert steps == 1


def test_under_ddp_only_the_last_micro_batch_synchronises(tmp_path):
    """A real (one-process, gloo) DistributedDataParallel: its communication hook runs once per gradient
    bucket for every backward pass that synchronises."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, criterion, _ = build_model(tiny_args("dn_dab_detr", *NOISELESS_DN))
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)  # one bucket
        synchronised = []

        def counting_hook(state, bucket):
            synchronised.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        images, targets = two_images([2, 2, 2, 2])
        batches = [(nested_tensor_from_tensor_list([image]), [target]) for image, target in zip(images, targets)]
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        stats = train_one_epoch(ddp, criterion, batches, optimizer, torch.device("cpu"), epoch=0,
                                accumulation_steps=2)
        assert stats["optimizer_steps"] == 2
        assert synchronised == [0, 0]  # micro-batches 1 and 3 (the last of each step), not 0 and 2
    finally:
        dist.destroy_process_group()
