"""Fast paths (Triton kernels) for the SupMAE step, installed as `supmae.kernels`.

Each kernel has an eager PyTorch twin in the model, and a test comparing the two; they are applied to a
plain model by small functions, never woven through it.
"""
