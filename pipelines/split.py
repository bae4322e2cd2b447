"""How a global batch is cut into micro-batches on ranks: the one layout the data order, the masks and the
classification head's BatchNorm groups follow. Pure Python: the CLI plans a split before torch loads.

Each optimizer step trains on `size` consecutive samples of the epoch's order. Micro-batch a of rank r holds
the contiguous rows [(a * world_size + r) * batch_size, + batch_size) of the step, so one micro-batch across
all ranks is a contiguous block too. A run on 2 ranks x 4 images, on 1 rank x 4 x 2 micro-batches and on
1 rank x 8 puts the same images in each step, and the same images together in every block of 4.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Split:
    batch_size: int      # images per rank per micro-batch
    world_size: int = 1  # ranks
    accum: int = 1       # micro-batches per optimizer step

    @property
    def size(self) -> int:
        """The global batch: the images of one optimizer step."""
        return self.batch_size * self.world_size * self.accum

    def locate(self, index: int) -> tuple[int, int]:
        """A rank's micro-batch counter -> (optimizer step, micro-batch within it)."""
        return divmod(index, self.accum)

    def rows(self, rank: int, micro: int) -> slice:
        """The rows of its step's global batch that micro-batch `micro` of rank `rank` holds."""
        first = (micro * self.world_size + rank) * self.batch_size
        return slice(first, first + self.batch_size)

    def __str__(self) -> str:
        accum = f" x {self.accum} micro-batches" if self.accum > 1 else ""
        return f"{self.world_size} rank(s) x {self.batch_size} images{accum}"
