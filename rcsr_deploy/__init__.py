"""rcsr-deploy: regularized calibration + successive rounding PTQ."""
__version__ = "0.1.0"
