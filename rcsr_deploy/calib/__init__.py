"""Calibration: from a Hugging Face model to quantized tensors, one decoder block at a time.

Read top-down:

* :mod:`.config` -- ``QuantizeConfig``, every setting that determines the codes;
* :mod:`.adapter` -- the model adapter: decoder blocks, their matmul weights, the output head;
* :mod:`.streams` -- the two activation streams (quantized path, FP path) and group inputs;
* :mod:`.solver` -- one layer: objective → grid → rounding (``quantize_linear``);
* :mod:`.store` -- the resume store (``--resume``);
* :mod:`.loop` -- the one block loop (``quantize_model``); RTN is a block without statistics.
"""
from .config import CLOSED_FORM_START, METHODS, QuantizeConfig
from .loop import quantize_model

__all__ = ["QuantizeConfig", "quantize_model", "METHODS", "CLOSED_FORM_START"]
