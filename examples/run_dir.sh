# Sourced by the example scripts: fresh_run_dir DIR NAME empties DIR for a new run, but only if
# it is empty or was made by the script NAME (a marker file), so a mistyped path is never wiped.
fresh_run_dir() {
  local dir=$1 marker="$1/.$2"
  if [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -f "$marker" ]; then
    echo "error: $dir is not empty and was not made by $2; pass a new directory" >&2
    exit 2
  fi
  rm -rf "$dir" && mkdir -p "$dir" && touch "$marker"
}
