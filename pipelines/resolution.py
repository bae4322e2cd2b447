"""Resolution schedules: the image side each epoch trains at, in steps of the patch size.

Two forms, both in whole epochs. A ramp, as FFCV's ImageNet recipe writes it (`start_ramp`, `end_ramp`):
`160-224@10-90` trains at 160 up to epoch 10, then at the linear interpolation rounded to the patch size,
and at 224 from epoch 90 on. Stages: `128@0,192@40,224@80` trains each size from its epoch on. The side
is a function of the epoch alone, so every engine, rank and resumed run agrees on it. Pure Python: the
CLI checks a schedule before anything heavy loads.
"""
import dataclasses
import re

from supmae.core.errors import SupmaeError

MAX_SIZES = 8  # distinct sides in one schedule: each costs the compiled step a graph of its own


@dataclasses.dataclass(frozen=True)
class ResolutionSchedule:
    stages: tuple[tuple[int, int], ...]  # (first epoch, side), epochs increasing from 0, sides changing
    patch_size: int
    final_epoch: int  # where the schedule, as written, reaches its last side (a ramp's end, the last stage)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted({size for _, size in self.stages}))

    def size_at(self, epoch: int) -> int:
        size = self.stages[0][1]
        for first, side in self.stages:
            if first > epoch:
                break
            size = side
        return size

    def check(self, img_size: int, epochs: float) -> None:
        """That a run of `epochs` epochs of a model of side `img_size` can follow the schedule."""
        if max(self.sizes) > img_size:
            raise SupmaeError(f"--resolution-schedule: {max(self.sizes)} is larger than the model's side {img_size}, "
                              "the largest it takes")
        if self.final_epoch >= epochs:
            raise SupmaeError(f"--resolution-schedule reaches its last side at epoch {self.final_epoch}, beyond the "
                              f"run's {epochs:g} epochs")

    def patches(self, side: int) -> int:
        """The patch count of a side x side image."""
        return (side // self.patch_size) ** 2


_RAMP = re.compile(r"(\d+)-(\d+)@(\d+)-(\d+)")
_STAGE = re.compile(r"(\d+)@(\d+)")


def parse_resolution_schedule(text: str, patch_size: int) -> ResolutionSchedule:
    """`text` in either form (module docstring) as a schedule over `patch_size` patches; a SupmaeError says
    what is wrong with it."""
    where = f"--resolution-schedule {text!r}"
    if ramp := _RAMP.fullmatch(text):
        start, end, first, final = map(int, ramp.groups())
        if final <= first:
            raise SupmaeError(f"{where}: the ramp's last epoch must come after its first")
        given = [start, end]
        stages = [(0, start)] + [(epoch, _ramp_size(start, end, first, final, epoch, patch_size))
                                 for epoch in range(first + 1, final + 1)]
    elif all(_STAGE.fullmatch(part) for part in text.split(",")):
        stages = [(int(epoch), int(size)) for size, epoch in (part.split("@") for part in text.split(","))]
        given, final = [size for _, size in stages], stages[-1][0]
        if stages[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
            raise SupmaeError(f"{where}: stages start at epoch 0 and their epochs increase")
    else:
        raise SupmaeError(f"{where} is neither a ramp (START-END@FROM-TO, e.g. 160-224@10-90) nor stages "
                          "(SIZE@EPOCH,..., e.g. 128@0,192@40,224@80)")
    bad = sorted({size for size in given if size % patch_size or size == 0})
    if bad:
        raise SupmaeError(f"{where}: {', '.join(map(str, bad))} is not a multiple of the patch size {patch_size}")
    changes = tuple(stage for i, stage in enumerate(stages) if i == 0 or stage[1] != stages[i - 1][1])
    schedule = ResolutionSchedule(changes, patch_size, final)
    if len(schedule.sizes) > MAX_SIZES:
        raise SupmaeError(f"{where} has {len(schedule.sizes)} sizes; at most {MAX_SIZES}, as the compiled step "
                          "keeps a graph per size")
    return schedule


def _ramp_size(start: int, end: int, first: int, last: int, epoch: int, patch_size: int) -> int:
    """FFCV ImageNet's `get_resolution`: the linear interpolation, rounded to the nearest multiple (of the patch
    size, where FFCV rounds to 32)."""
    share = min(max((epoch - first) / (last - first), 0.0), 1.0)
    return round((start + share * (end - start)) / patch_size) * patch_size


def side_at(resolution: ResolutionSchedule | None, img_size: int, epoch: int) -> int:
    """The side of epoch `epoch`'s views: the schedule's, or `img_size` throughout without one."""
    return img_size if resolution is None else resolution.size_at(epoch)
