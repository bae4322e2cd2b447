"""The one place a training step happens: micro-batches through the forward, one optimizer step."""
import contextlib

import torch


def text_inputs(batch) -> dict:
    """The caption tokens and text mask a text model's forward takes from a batch (none for the others)."""
    return {} if batch.tokens is None else dict(tokens=batch.tokens, text_mask=batch.text_mask)


def train_step(forward, micro_batches, optimizer, scaler, autocast) -> torch.Tensor:
    """One optimizer step over the micro-batches; returns their mean loss and its parts (the order of the
    model's `loss_names`), on the device."""
    losses = []
    no_sync = getattr(forward, "no_sync", None)  # DDP: reduce gradients once, after the last micro-batch
    for i, batch in enumerate(micro_batches):
        with autocast, (no_sync() if no_sync and i < len(micro_batches) - 1 else contextlib.nullcontext()):
            out = forward(batch.images, batch.labels, masking=batch.masking, **text_inputs(batch))
        # Copied out first: under CUDA graphs the outputs' memory belongs to the graph's next replay.
        losses.append(torch.stack([t.detach().float() for t in out.losses().values()]))
        scaler.scale(out.loss / len(micro_batches)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(0)
