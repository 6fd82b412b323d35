"""Networks: the ADM-style U-Net (`unet`), its plain blocks (`layers`) and the same
blocks written for XLA:CPU (`cpu`)."""
