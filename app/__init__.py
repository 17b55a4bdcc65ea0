"""Gradio front end of the RAL workbench; all computation is in ral_core."""
import os

# Before anything imports gradio / transformers: no outside hosts, no downloads.
for _k, _v in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)
