"""RAL workbench engine: capture, train on and compare a vision-language model's attention."""
__version__ = "0.1.0"
