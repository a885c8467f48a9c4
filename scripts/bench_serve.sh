#!/usr/bin/env bash
# Serving benchmark on the lent GPU machine, run from the repo root:
#   bash scripts/bench_serve.sh [STAGES]     STAGES: comma list of install,build,offline,serve (default: all four)
#
# 1. install: the wheels carried in .whl/ (server deps, nccl4py, aiperf and its deps; made here by
#             scripts/fetch_serve_wheels.sh with the .venv active; carry .whl) into $SITE.
# 2. build:   a random-weight Llama-3-8B-shape bf16 engine with the SmolLM2 tokenizer (.whl/smollm2-tokenizer):
#             vocabulary = the tokenizer's 49,152 ids (see dist_infer/engine/random_engine.py). Skipped when
#             $ENGINE/engine.json exists (a warm machine keeps /tmp between calls).
# 3. offline: `dist-infer bench` on the same engine (needs `bench --engine`; without it, on the preset, noted).
# 4. serve:   `dist-infer serve` in the background, /health, one probe request, then aiperf `profile`
#             (synthetic prompts, $ISL in / $OSL out, ignore_eos, streaming) at each concurrency in
#             $CONCURRENCIES and one Poisson request-rate run; prints the table of scripts/aiperf_summary.py.
#             After each run a server whose /health is not 200 is restarted (noted in serve.log), so one
#             failing load level leaves the later ones measurable. The offline log is kept in $KEEP
#             (/tmp) so that a serve stage in a later call on the same warm machine still shows it.
#
# Files in $OUT (at most 8, as the device tool returns): gpu.txt build.log bench_offline.log serve.log
# summary.txt aiperf_summary.json aiperf_exports.tar.gz (each run's JSON/CSV exports, records and logs).
#
# Settings (environment):
#   ENGINE=/tmp/engine-8b PRESET=llama-3-8b TOKENIZER=.whl/smollm2-tokenizer MAX_BATCH=256 MAX_SEQ=2048
#   ISL=128 OSL=128 CONCURRENCIES="1 16 64 256" OFFLINE_BATCHES="1 16 64 256"
#   RATE=auto (0.75 x the best request throughput of the concurrency runs) or a number of requests/s
#   TEMPERATURE=0 (what every request asks; the offline bench is greedy, so 0 compares like with like)
#   ENDPOINT=completions|chat PORT=8000 HEALTH_TIMEOUT=600 AIPERF_TIMEOUT=300 (seconds per run)
#   SERVE_CMD (default: python3 -m dist_infer serve --engine $ENGINE --device cuda --port $PORT): any
#     OpenAI-compatible server with /health can be measured by the same harness.
#   PYTHON=python3 SITE=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench_serve}; mkdir -p "$OUT"
STAGES=${1:-install,build,offline,serve}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
ENGINE=${ENGINE:-/tmp/engine-8b}
PRESET=${PRESET:-llama-3-8b}
TOKENIZER=$(realpath "${TOKENIZER:-.whl/smollm2-tokenizer}")  # aiperf treats only absolute/./ paths as local
MAX_BATCH=${MAX_BATCH:-256}; MAX_SEQ=${MAX_SEQ:-2048}
ISL=${ISL:-128}; OSL=${OSL:-128}
CONCURRENCIES=${CONCURRENCIES:-1 16 64 256}
OFFLINE_BATCHES=${OFFLINE_BATCHES:-1 16 64 256}
RATE=${RATE-auto}  # empty: no Poisson run
ENDPOINT=${ENDPOINT:-completions}
TEMPERATURE=${TEMPERATURE:-0}  # 0: greedy, like the offline bench beside it; OpenAI's default 1.0 adds sampling
PORT=${PORT:-8000}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
AIPERF_TIMEOUT=${AIPERF_TIMEOUT:-300}
SERVE_CMD=${SERVE_CMD:-$PYTHON -m dist_infer serve --engine $ENGINE --device cuda --port $PORT}
ART=${ART:-/tmp/aiperf-runs}
KEEP=${KEEP:-/tmp/bench-serve-keep}; mkdir -p "$KEEP"
URL=http://127.0.0.1:$PORT

export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# aiperf 0.13 loads a local tokenizer directory only when HF offline mode is NOT set (in offline mode it
# asks the hub cache for a repo id and fails on a path); with an absolute path it never contacts the hub.
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
has() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "== $(date +%T) $*"; }

if has install; then
    say "install .whl/*.whl into $SITE"
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, aiperf, fastapi, uvicorn; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'aiperf', aiperf.__version__ if hasattr(aiperf, '__version__') else '?', 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

if has build; then
    if [[ -f $ENGINE/engine.json ]]; then
        say "engine $ENGINE exists; not rebuilt" | tee "$OUT/build.log"
    else
        say "build random $PRESET engine -> $ENGINE" | tee "$OUT/build.log"
        { time $PYTHON -m dist_infer build --random-weights "$PRESET" --tokenizer "$TOKENIZER" --out "$ENGINE" \
            --dtype bfloat16 --max-batch-size "$MAX_BATCH" --max-seq-len "$MAX_SEQ"; } 2>&1 | tee -a "$OUT/build.log"
        [[ -f $ENGINE/engine.json ]] || { echo "engine build failed"; exit 1; }
    fi
    $PYTHON -c "import json,sys; s=json.load(open(sys.argv[1])); m=s['model']; print('engine:', m['vocab_size'], 'vocab,', m['num_layers'], 'layers, hidden', m['hidden_size'], s['build'], s.get('random_weights'))" \
        "$ENGINE/engine.json" | tee -a "$OUT/build.log"
fi

if has offline; then
    say "offline dist-infer bench" | tee "$OUT/bench_offline.log"
    if $PYTHON -m dist_infer bench --help 2>/dev/null | grep -q -- '--engine'; then
        $PYTHON -m dist_infer bench --engine "$ENGINE" --batch-size $OFFLINE_BATCHES --input-len "$ISL" \
            --output-len "$OSL" 2>&1 | tee -a "$OUT/bench_offline.log"
    else
        echo "NOTE: 'dist-infer bench' has no --engine: measured on --model $PRESET (its own random weights and" \
             "the preset's vocabulary), not on $ENGINE" | tee -a "$OUT/bench_offline.log"
        $PYTHON -m dist_infer bench --model "$PRESET" --batch-size $OFFLINE_BATCHES --input-len "$ISL" \
            --output-len "$OSL" 2>&1 | tee -a "$OUT/bench_offline.log"
    fi
    cp "$OUT/bench_offline.log" "$KEEP/bench_offline.log"  # $OUT is emptied per call; /tmp stays while warm
fi

if has serve; then
    rm -rf "$ART"; mkdir -p "$ART"
    # The offline stage may have run in an earlier call (split calls): bring its log back into $OUT.
    [[ -f $OUT/bench_offline.log || ! -f $KEEP/bench_offline.log ]] || cp "$KEEP/bench_offline.log" "$OUT/"
    stop_server() {
        kill -TERM -- -"$SERVER" 2>/dev/null || kill -TERM "$SERVER" 2>/dev/null
        for _ in $(seq 1 20); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 0.5; done
        kill -KILL -- -"$SERVER" 2>/dev/null || kill -KILL "$SERVER" 2>/dev/null
    }
    start_server() {  # start in the background (log appended), wait for /health 200, probe; sets SERVER, PROBE
        say "start: $SERVE_CMD"
        setsid $SERVE_CMD >> "$OUT/serve.log" 2>&1 &
        SERVER=$!
        # Wait for /health 200, the probe request, the model name and whether streamed usage is reported.
        PROBE=$($PYTHON - "$URL" "$ENDPOINT" "$HEALTH_TIMEOUT" "$SERVER" "$ENGINE" <<'PY'
import json, os, sys, time, urllib.request
url, endpoint, timeout, pid, engine = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.time()
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"server exited before /health answered 200 (see serve.log)")
    if time.time() - t0 > timeout:
        sys.exit(f"/health not 200 after {timeout:.0f} s")
    time.sleep(1)
print(f"/health 200 after {time.time() - t0:.1f} s", file=sys.stderr)
model = os.path.basename(engine.rstrip("/"))
try:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
except Exception as exc:
    print(f"/v1/models: {exc}; model name {model!r}", file=sys.stderr)
body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8, "ignore_eos": True}
if endpoint == "chat":
    path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "The capital of France is"}]
else:
    path, body["prompt"] = "/v1/completions", "The capital of France is"
req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
usage, text, t0 = None, "", time.time()
with urllib.request.urlopen(req, timeout=120) as r:
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
print(f"probe {path}: {time.time() - t0:.2f} s, text {text!r}, usage {usage}", file=sys.stderr)
print(model, "server" if usage and usage.get("completion_tokens") else "client")
PY
        )
    }
    healthy() { $PYTHON -c "import sys, urllib.request as u; sys.exit(u.urlopen(sys.argv[1] + '/health', timeout=5).status != 200)" "$URL" 2>/dev/null; }
    : > "$OUT/serve.log"
    trap stop_server EXIT
    if ! start_server; then
        echo "server not ready; serve.log tail:"; tail -40 "$OUT/serve.log"; exit 1
    fi
    SERVER_OK=1
    read -r MODEL COUNTING <<<"$PROBE"
    TOKEN_FLAGS=(); [[ $COUNTING == server ]] && TOKEN_FLAGS=(--use-server-token-count)
    say "model $MODEL; output tokens counted by the $COUNTING"

    run_aiperf() {  # NAME, then load flags
        local name=$1; shift
        [[ $SERVER_OK == 1 ]] || { echo "aiperf $name skipped: no healthy server"; return; }
        say "aiperf $name: $*"
        timeout "$AIPERF_TIMEOUT" $PYTHON -m aiperf profile --model "$MODEL" --tokenizer "$TOKENIZER" --url "$URL" \
            --endpoint-type "$ENDPOINT" --streaming --isl "$ISL" --isl-stddev 0 --osl "$OSL" --osl-stddev 0 \
            --extra-inputs ignore_eos:true --extra-inputs "temperature:$TEMPERATURE" "${TOKEN_FLAGS[@]}" --random-seed 0 --ui-type none --no-gpu-telemetry \
            --artifact-dir "$ART/$name" "$@" > "$ART/$name.log" 2>&1
        local rc=$?
        [[ $rc == 0 ]] || { echo "aiperf $name exited $rc; its log tail:"; tail -15 "$ART/$name.log"; }
        kill -0 "$SERVER" 2>/dev/null || { echo "the server died during $name; serve.log tail:"; tail -30 "$OUT/serve.log"; }
        # One failing load level must not fail the ones after it: restart an unhealthy server (/health not 200).
        if ! healthy; then
            echo "the server is unhealthy after $name (/health not 200): restarting it" | tee -a "$OUT/serve.log"
            stop_server
            start_server || { SERVER_OK=0; echo "restart failed; serve.log tail:"; tail -30 "$OUT/serve.log"; }
        fi
    }
    RUNS=()
    for c in $CONCURRENCIES; do
        n=$(( c * 3 > 32 ? c * 3 : 32 ))
        run_aiperf "c$c" --concurrency "$c" --request-count "$n" --warmup-request-count "$(( c > 4 ? c : 4 ))"
        RUNS+=("c$c=$ART/c$c")
    done
    RATE_ASKED=$RATE
    if [[ $RATE == auto ]]; then
        RATE=$($PYTHON -c "
import json, pathlib, sys
best = 0.0
for p in pathlib.Path(sys.argv[1]).glob('c*/profile_export_aiperf.json'):
    best = max(best, json.loads(p.read_text()).get('request_throughput', {}).get('avg') or 0.0)
print(f'{0.75 * best:.2f}' if best else '')" "$ART")
    fi
    if [[ -n $RATE ]]; then
        n=$($PYTHON -c "print(min(1200, max(64, round(float('$RATE') * 30))))")
        run_aiperf rate --request-rate "$RATE" --arrival-pattern poisson --request-count "$n"
        RUNS+=("poisson=$ART/rate")
    else
        [[ -z $RATE_ASKED ]] && echo "RATE= (empty): no Poisson run" || echo "no request rate: every concurrency run failed"
    fi
    stop_server; trap - EXIT
    tail -5 "$OUT/serve.log"
    tar czf "$OUT/aiperf_exports.tar.gz" -C "$ART" --exclude='*_raw.jsonl' . 2>/dev/null
    $PYTHON scripts/aiperf_summary.py --bench-log "$OUT/bench_offline.log" "${RUNS[@]}" \
        --json "$OUT/aiperf_summary.json" | tee "$OUT/summary.txt"
fi
