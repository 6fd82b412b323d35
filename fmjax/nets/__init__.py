"""Networks: the ADM-style U-Net."""
from fmjax.nets.unet import UNet, create, param_count

__all__ = ["UNet", "create", "param_count"]
