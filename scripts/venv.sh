# shellcheck shell=bash
# Sourced: where the project's Python venv lives (made by scripts/setup.sh).
#   DPO_VENV     the venv (default ~/.cache/dpo_dist/venv, outside any checkout: every clone
#                and CI use the same one, so torch's ~6 GB are downloaded once per machine)
#   DPO_PYTHON   its interpreter; CMake takes libtorch from it (torch.utils.cmake_prefix_path)
export DPO_VENV=${DPO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dpo_dist/venv}
export DPO_PYTHON=${DPO_PYTHON:-$DPO_VENV/bin/python}
