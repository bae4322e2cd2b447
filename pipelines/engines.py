"""The loader engines by name, each as "module:class": imported only when picked, so an engine's package
is needed only by the runs that use it, and a name is checked without importing any of them."""

ENGINES = {
    "torch": "supmae.pipelines.torch_loader:TorchLoader",
    "ffcv": "supmae.pipelines.ffcv_loader:FFCVLoader",
    "dali": "supmae.pipelines.dali_loader:DALILoader",
}
PACKAGES = {"ffcv": "ffcv", "dali": "nvidia-dali-cuda130"}  # what an engine's import failure asks for
