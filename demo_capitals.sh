#!/usr/bin/env bash
# Capital-cities quiz: twelve prompts run as ONE continuous batch through `nanovllm ask`,
# greedy, with the engine's default model (SmolLM2-135M-Instruct, fetched on first use).
# An answer is correct when it names the capital. Extra arguments go to `nanovllm ask`:
#   ./demo_capitals.sh --model models/my-model --verbose
# Runs on macOS's bash 3.2 too.
set -euo pipefail
cd "$(dirname "$0")"

countries=(France Germany Italy Spain Japan Russia Canada China Greece Egypt Australia Kenya)
capitals=(Paris Berlin Rome Madrid Tokyo Moscow Ottawa Beijing Athens Cairo Canberra Nairobi)

prompts=()
for country in "${countries[@]}"; do
  prompts+=("The capital city of $country is")
done

if command -v nanovllm >/dev/null 2>&1; then
  nanovllm=(nanovllm)
else
  nanovllm=(python3 -m cli.main)  # not installed as a command: run it from the checkout
fi

# Captured, so not a terminal: plain "[i/N] prompt" lines, each followed by its answer.
# Base-model completion (--no-chat), cut at the end of the first sentence or line.
output=$("${nanovllm[@]}" ask --no-chat --temperature 0 --max-tokens 12 \
  --stop . --stop $'\n' ${1+"$@"} "${prompts[@]}")

answers=()
index=-1
while IFS= read -r line; do
  if [[ $line =~ ^\[([0-9]+)/[0-9]+\]\  ]]; then
    index=$((BASH_REMATCH[1] - 1))
    answers[index]=""
  elif ((index >= 0)) && [[ -n $line ]]; then
    answers[index]="${answers[index]}${answers[index]:+ }$line"
  fi
done <<<"$output"

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

score=0
for i in "${!countries[@]}"; do
  answer=${answers[i]:-}
  if [[ $(lower "$answer") == *"$(lower "${capitals[i]}")"* ]]; then
    mark="ok "
    score=$((score + 1))
  else
    mark="MISS"
  fi
  printf '%-4s %-10s %-9s <- %s\n' "$mark" "${countries[i]}" "${capitals[i]}" "$answer"
done
printf '\nscore: %d/%d\n' "$score" "${#countries[@]}"
