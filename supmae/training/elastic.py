"""A run is defined by its global batch, not by how it is split: how a run splits it on the ranks it has now.

The data order, crops and masks are functions of a sample's row in its step's global batch
(`pipelines.split`), so every split of the same global batch trains the same steps. Two losses couple images
beyond that, and a split must keep their groups whole: the classification head's BatchNorm normalises over the
images one micro-batch held when the run began (on every rank, with --sync-bn), and a contrastive loss scores
each image against the images of its micro-batch on every rank. Pure Python: nothing here needs torch.
"""
import dataclasses

from supmae.core.errors import SupmaeError
from supmae.pipelines.split import Split


@dataclasses.dataclass(frozen=True)
class Groups:
    """Images a model's losses couple, which every split of its run must keep together (None: no such loss)."""
    batchnorm: int | None = None    # the classification head's BatchNorm normalises over this many
    contrastive: int | None = None  # a contrastive loss scores this many against each other

    @classmethod
    def first(cls, split: Split, *, classifies: bool, contrastive: bool, sync_bn: bool) -> "Groups":
        """The groups a run fixes when it begins with `split`."""
        across = split.batch_size * split.world_size
        return cls(batchnorm=(across if sync_bn else split.batch_size) if classifies else None,
                   contrastive=across if contrastive else None)

    def problem(self, split: Split) -> str | None:
        """Why `split` cannot keep these groups whole; None when it can. A BatchNorm group is a part of a
        micro-batch or the micro-batches of a few ranks; a contrastive group is one micro-batch on every rank."""
        b, w = split.batch_size, split.world_size
        if self.contrastive and b * w != self.contrastive:
            return (f"the contrastive loss scores each image against the {self.contrastive} images of its "
                    f"micro-batch on every rank, and {split} hold {b * w}")
        g = self.batchnorm
        if g and not (b % g == 0 or (g % b == 0 and w % (g // b) == 0)):
            return (f"the classification head's BatchNorm normalises over groups of {g} images, which micro-batches "
                    f"of {b} on {w} rank(s) cannot form")
        return None


def first_split(*, world_size: int, batch_size: int, accum: int | None, global_batch: int | None) -> Split:
    """The split a new run begins with: --accum-iter (1 unless --global-batch asks for more) micro-batches of
    --batch-size on each rank."""
    if global_batch is None:
        return Split(batch_size, world_size, accum or 1)
    ranks = f"{world_size} rank(s) x --batch-size {batch_size}"
    if accum is None:
        if global_batch % (world_size * batch_size):
            raise SupmaeError(f"--global-batch {global_batch} is not a multiple of {ranks}")
        accum = global_batch // (world_size * batch_size)
    if world_size * batch_size * accum != global_batch:
        raise SupmaeError(f"--global-batch {global_batch} is not {ranks} x --accum-iter {accum} = "
                          f"{world_size * batch_size * accum}; leave --accum-iter unset to derive it")
    return Split(batch_size, world_size, accum)


def resume_split(saved: Split, groups: Groups, *, world_size: int, batch_size: int, accum: int | None,
                 global_batch: int | None) -> Split:
    """The split on `world_size` ranks of the global batch a checkpoint made with `saved` trained on.

    --batch-size and --accum-iter as the checkpoint had them (a resumed run takes them from it) or unset leave
    the choice here: the checkpoint's micro-batch where it fits, else the largest smaller one, else the
    smallest larger one that keeps `groups` whole. One of them changed fixes it and the other follows; both
    changed must make the same global batch. A SupmaeError says why no split will do."""
    size = saved.size
    made = f"the run was made with a global batch of {size} ({saved})"
    if global_batch is not None and global_batch != size:
        raise SupmaeError(f"{made}, not --global-batch {global_batch}: a resumed run keeps its global batch")
    if size % world_size:
        raise SupmaeError(f"{made}, which {world_size} ranks cannot share equally")
    per_rank = size // world_size
    if batch_size != saved.batch_size and accum not in (None, saved.accum) and batch_size * accum != per_rank:
        raise SupmaeError(f"{made}; {Split(batch_size, world_size, accum)} make {world_size * batch_size * accum}: "
                          "leave --accum-iter unset to derive it")
    chosen_here = batch_size == saved.batch_size and accum in (None, saved.accum)
    if batch_size != saved.batch_size:
        sizes = [batch_size]
    elif not chosen_here:
        sizes = [per_rank // accum] if accum and per_rank % accum == 0 else []
    else:
        sizes = sorted((b for b in range(1, per_rank + 1) if per_rank % b == 0),
                       key=lambda b: (b > saved.batch_size, abs(b - saved.batch_size)))
    candidates = [Split(b, world_size, per_rank // b) for b in sizes if per_rank % b == 0]
    if not candidates:
        asked = f"--batch-size {batch_size}" if batch_size != saved.batch_size else f"--accum-iter {accum}"
        raise SupmaeError(f"{made}: {world_size} rank(s) with {asked} cannot make it")
    for split in candidates:
        if groups.problem(split) is None:
            return split
    tried = f", and no split of it on {world_size} rank(s) keeps its groups" if chosen_here else ""
    raise SupmaeError(f"{made}{tried}: {groups.problem(candidates[0])}")
