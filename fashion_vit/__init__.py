"""fashion-vit: fine-tune, search, serve and batch-label a ViT on fashion product images with Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fashion-vit")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
