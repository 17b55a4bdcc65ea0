# The workbench on CPU: same install as the Makefile, app on port 7860.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
    RAL_HOST=0.0.0.0 RAL_PORT=7860
WORKDIR /srv/ral
COPY requirements.txt pyproject.toml README.md ./
# the CPU wheel index keeps the image small; on a GPU host drop --index-url to get the CUDA build
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -r requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
EXPOSE 7860
CMD ["python", "-m", "app"]
