"""squibd: save and restore running KVM virtual machines."""

__version__ = "0.1.0"
__all__ = ["__version__"]
