"""Gradio front end of the RAL workbench; all computation is in ral_core."""
