"""cellarium-steps: streaming single-cell ML steps and the workflow that chains them."""

__version__ = "0.1.0"
