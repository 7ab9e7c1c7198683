#!/usr/bin/env bash
# Set up riskfast in .venv at the repository root: safe to rerun, and quick when
# nothing changed.
#
#   bash scripts/setup.sh               # riskfast with the [test] extras
#   bash scripts/setup.sh test,trl      # other extras; "" installs none
#
# - Creates .venv if missing. Where the system python3 already has a CUDA build of
#   torch, the venv sees the system packages and that torch is kept; otherwise the
#   CPU wheel torch==2.13.0 is installed (a loose spec would pull a multi-GB CUDA build).
# - Installs the build tools, then builds riskfast in editable mode against that torch
#   (pip install --no-build-isolation -e .): Python edits need no rerun, changes to
#   csrc/, CMakeLists.txt or pyproject.toml do (the rebuild is incremental).
# Environment: PYTHON (interpreter for a new venv, default python3), RISKFAST_PIP_ARGS
# (extra pip arguments, e.g. "--no-index --find-links /wheels" on a machine without
# network), RISKFAST_FORCE_INSTALL=1 (reinstall even if nothing changed).
set -euo pipefail

extras="${1-test}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
vpy="$venv/bin/python"
torch_pin="torch==2.13.0"
cmake_min="3.24"

read -r -a pip_extra <<<"${RISKFAST_PIP_ARGS:-}"
pip_install() {
  "$vpy" -m pip install -q --disable-pip-version-check --progress-bar off \
    ${pip_extra[@]+"${pip_extra[@]}"} "$@"
}
say() { echo "setup.sh: $*" >&2; }

# --- 1. the virtual environment ------------------------------------------------------
if [ ! -x "$vpy" ]; then
  py="${PYTHON:-python3}"
  command -v "$py" >/dev/null || { say "no '$py' found; set PYTHON"; exit 1; }
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { say "riskfast needs Python >= 3.10; '$py' is $("$py" -V 2>&1)"; exit 1; }
  if "$py" -c 'import sys, torch; sys.exit(not torch.version.cuda)' >/dev/null 2>&1; then
    say "creating .venv over the system's CUDA torch (kept as it is)"
    "$py" -m venv --system-site-packages "$venv"
  else
    say "creating .venv"
    "$py" -m venv "$venv"
  fi
fi

# --- 2. torch and the build tools (only what is missing) -----------------------------
missing=()
"$vpy" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' ||
  missing+=("$torch_pin")
"$vpy" -c 'import scikit_build_core' 2>/dev/null || missing+=("scikit-build-core>=0.10")
"$vpy" -c 'import pybind11' 2>/dev/null || missing+=("pybind11>=2.12")
cmake_ok() {  # a cmake >= cmake_min in the venv or on PATH
  local bin version
  bin="$(PATH="$venv/bin:$PATH" command -v cmake)" || return 1
  version="$("$bin" --version | head -n 1 | awk '{print $3}')"
  [ "$(printf '%s\n%s\n' "$cmake_min" "$version" | sort -V | head -n 1)" = "$cmake_min" ]
}
cmake_ok || missing+=("cmake>=$cmake_min")
PATH="$venv/bin:$PATH" command -v ninja >/dev/null || missing+=("ninja")
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

# --- 3. riskfast itself (skipped when its inputs have not changed) --------------------
# The stamp covers what an editable install bakes in: the build files, the C++/CUDA
# sources, the extras, the torch it builds against and where the tree lives. Python
# files (new ones too) are served live from python/ and kernels/.
stamp_file="$venv/.riskfast-setup-stamp"
stamp="$(
  {
    echo "root=$root extras=$extras"
    "$vpy" -c 'import importlib.metadata as m; print("torch", m.version("torch"))'
    cat pyproject.toml CMakeLists.txt
    find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) \
      -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
)"
if [ "${RISKFAST_FORCE_INSTALL:-0}" != 1 ] && [ -f "$stamp_file" ] &&
  [ "$(cat "$stamp_file")" = "$stamp" ] &&
  "$vpy" -c 'import importlib.metadata as m; m.version("riskfast")' 2>/dev/null; then
  say "riskfast is up to date in .venv"
  exit 0
fi

target="."
[ -n "$extras" ] && [ "$extras" != none ] && target=".[$extras]"
say "building and installing riskfast ($target) against $("$vpy" -c \
  'import importlib.metadata as m; print("torch", m.version("torch"))')"
rm -f "$stamp_file"
pip_install --no-build-isolation -e "$target"

# --- 4. verl for the integration tests (its own dependencies pull GPU-only packages) ---
# verl 0.9.1 goes in without its dependencies, then what importing its core algorithms
# needs; a constraint keeps pip from replacing the torch riskfast was built against.
case ",$extras," in
  *,test,* | *,verl,*)
    constraints="$venv/.riskfast-torch-constraint.txt"
    "$vpy" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
      >"$constraints"
    say "installing verl 0.9.1 (without its GPU-only dependencies)"
    pip_install -c "$constraints" --no-deps "verl==0.9.1"
    pip_install -c "$constraints" ray tensordict hydra-core codetiming dill pandas orjson
    ;;
esac
echo "$stamp" >"$stamp_file"
say "done"
