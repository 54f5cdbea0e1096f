# unified-inference with SGLang, vLLM and llama.cpp.
#   docker build -t unified-inference .
#   docker run --gpus all -p 3001:3001 -v $(pwd)/config:/app/config unified-inference
#   docker run -p 3001:3001 -v $(pwd)/config:/app/config -e EXECUTION_MODE=cpu unified-inference
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

# The code lives outside /app/config, which users mount over with their models.yaml.
WORKDIR /opt/unified-inference
COPY requirements.txt requirements-gpu.txt ./

# One virtual environment per GPU engine: SGLang and vLLM pin different torch builds.
RUN python3 -m venv /opt/sglang && /opt/sglang/bin/pip install -c requirements-gpu.txt "sglang[all]"
RUN python3 -m venv /opt/vllm && /opt/vllm/bin/pip install -c requirements-gpu.txt vllm
RUN python3 -m venv /opt/venv \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    /opt/venv/bin/pip install -r requirements.txt

COPY main.py ./
COPY api/ api/
COPY router/ router/
COPY lifecycle/ lifecycle/
COPY backends/ backends/
COPY config/ config/
COPY config/models.yaml /app/config/models.yaml

ENV PATH=/opt/venv/bin:$PATH \
    MODELS_CONFIG_PATH=/app/config/models.yaml \
    STATE_DIR=/app/state \
    SGLANG_COMMAND="/opt/sglang/bin/python -m sglang.launch_server" \
    VLLM_COMMAND="/opt/vllm/bin/vllm serve"

EXPOSE 3001
STOPSIGNAL SIGTERM
CMD ["python", "main.py"]
