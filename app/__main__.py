"""`python -m app` (what `make demo` runs): serve the workbench on RAL_HOST:RAL_PORT (127.0.0.1:7860)."""
from app import startup

if __name__ == "__main__":
    startup.check_port()  # a busy port is one line at once, not a traceback after the imports
    startup.say("starting the RAL workbench: loading torch, transformers and gradio …")
    from app.main import launch

    launch()
