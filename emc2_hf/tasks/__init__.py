"""Tasks: how a batch of one kind of data is encoded and turned into the objective's problem."""

from .image_text import MAX_LOGIT_SCALE, image_text_step_problems, logit_scale_parameter

__all__ = ["MAX_LOGIT_SCALE", "image_text_step_problems", "logit_scale_parameter"]
