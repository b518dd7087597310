# Sourced by scripts/test.sh and scripts/demo.sh. ccache (when installed) keeps its cache
# in ~/.cache/ccache across runs and clones: paths relative to the checkout, and
# targets that use the precompiled header allowed to hit.
export CCACHE_BASEDIR="$PWD"
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
