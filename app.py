"""Hugging Face Spaces entry point (`app_file: app.py`): serves the workbench on 0.0.0.0:7860.

The `app/` package takes precedence over this file on import, so `from app.main import …` is the package.
"""
import os

os.environ.setdefault("RAL_HOST", "0.0.0.0")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.main import launch  # noqa: E402

if __name__ == "__main__":
    launch()
