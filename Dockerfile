# The workbench on CPU (a Docker Space or any container host): runtime dependencies only, run as a non-root user,
# app on port 7860. The build context is trimmed by .dockerignore (no .venv, runs, outputs, bench work, .git).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
    RAL_HOST=0.0.0.0 RAL_PORT=7860
# uid 1000: the user Hugging Face's Docker Spaces run containers as, so files the app writes stay its own
RUN useradd --create-home --uid 1000 ral
WORKDIR /srv/ral
COPY requirements.txt pyproject.toml README.md ./
# PyTorch's CPU index: the same torch release as requirements.txt without the CUDA libraries (GBs) a CPU image
# cannot use; on a GPU host drop --index-url to get PyPI's CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -r requirements.txt
COPY --chown=ral:ral . .
RUN pip install --no-deps -e .
USER ral
ENV HOME=/home/ral
EXPOSE 7860
CMD ["python", "-m", "app"]
