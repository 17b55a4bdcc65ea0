"""`python -m app` (what `make demo` runs): serve the workbench on RAL_HOST:RAL_PORT (127.0.0.1:7860)."""
from app.main import launch

if __name__ == "__main__":
    launch()
