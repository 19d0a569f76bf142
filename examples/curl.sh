#!/usr/bin/env bash
# Chat Completions through tokenrelay with nothing but curl: one answer streamed token by token, then the
# same question without streaming.
#
#   bash examples/curl.sh ["your question"]
#
# Environment (the same for every example):
#   TOKENRELAY_URL      the gateway (default http://127.0.0.1:8080)
#   TOKENRELAY_MODEL    a model it serves (default tiny, the embedded model)
#   TOKENRELAY_API_KEY  sent as a Bearer token, only when the gateway has API keys
set -euo pipefail

url="${TOKENRELAY_URL:-http://127.0.0.1:8080}"
model="${TOKENRELAY_MODEL:-tiny}"
prompt="${1:-Name three colours.}"

# Escape the question for JSON by hand (backslashes first, then quotes), so nothing beyond bash is needed.
prompt="${prompt//\\/\\\\}"
prompt="${prompt//\"/\\\"}"
messages="[{\"role\": \"user\", \"content\": \"$prompt\"}]"

headers=(-H "content-type: application/json")
if [[ -n "${TOKENRELAY_API_KEY:-}" ]]; then
  headers+=(-H "authorization: Bearer $TOKENRELAY_API_KEY")
fi

echo "### streaming"
# -N turns off curl's output buffer, so each `data:` line shows the moment the gateway writes it.
# include_usage adds one last chunk (empty choices) with the token counts before `data: [DONE]`.
# --fail-with-body: an error status (an unknown model, say) still shows the gateway's JSON error, and the
# script stops with a non-zero exit code.
curl -sS -N --fail-with-body "$url/v1/chat/completions" "${headers[@]}" \
  -d "{\"model\": \"$model\", \"stream\": true, \"stream_options\": {\"include_usage\": true}, \"messages\": $messages}"

echo "### not streaming"
# The whole answer in one JSON body: choices[0].message.content, finish_reason and usage.
curl -sS --fail-with-body "$url/v1/chat/completions" "${headers[@]}" \
  -d "{\"model\": \"$model\", \"messages\": $messages}"
echo
