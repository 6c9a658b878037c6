#!/usr/bin/env bash
# Installs every system package lomo needs to build and test, from Debian 12 packages.
# Idempotent: packages already present are left alone, so a second run costs only the check.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config
  libgtest-dev libgmock-dev
  libdnnl-dev              # oneDNN: CPU GEMMs with runtime ISA dispatch, bf16 on AVX512-BF16/AMX
  nlohmann-json3-dev
  libyaml-cpp-dev          # job spec YAML (0.7 on Debian 12)
  libsentencepiece-dev     # SentencePiece tokenizer.model (LLaMA-1/2, Mistral)
  libonig-dev              # Oniguruma: tokenizer.json split/replace regexes, as HF tokenizers
  libutf8proc-dev          # NFC/NFKC normalizers of tokenizer.json
  clang libclang-rt-14-dev # libFuzzer for the parser fuzz targets
  clang-format clang-tidy  # scripts/check_format.sh, scripts/check_tidy.sh (CI)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler  # control plane API
  libsqlite3-dev           # coordinator job store
  prometheus-cpp-dev       # /metrics
  libssl-dev               # SHA-256 of checkpoint files (common/sha256)
  libcpp-httplib-dev       # REST/JSON for dashboards
  libgloo-dev              # collectives between the CPU ranks of a data-parallel job (worker/comm)
  prometheus yamllint      # promtool and yamllint: offline checks of deploy/ (tests/deploy)
  python3-venv             # tests/hf/hf_roundtrip_test.sh: its transformers environment
  openssl curl             # tests/integration/tls_test: test CA and certificates, HTTPS client
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
