"""Fixed 2-D sine-cosine position embeddings, laid out as in MAE's checkpoints."""
import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(grid_size**2 [+1], dim) float32; the cls row, when present, is zero.

    The first half of the channels encodes the column index and the second the row index (MAE builds
    its grid with meshgrid(w, h)), computed in float64 like the reference before the cast.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def on_grid(table: torch.Tensor, full: int, grid: int) -> torch.Tensor:
    """The rows of a (1, [1 +] full**2, D) position table that a grid x grid image takes: the cls row, if any,
    then its patches'. Both grids number their patches from the top left, so for grid <= full these rows
    are exactly `sincos_2d(D, grid)`: a smaller image takes the positions of its own patches, no
    interpolation."""
    if grid == full:
        return table
    cls = table.shape[1] - full * full
    coords = torch.arange(grid, device=table.device)
    rows = table[:, (coords[:, None] * full + coords).flatten() + cls]
    return torch.cat([table[:, :cls], rows], dim=1) if cls else rows
