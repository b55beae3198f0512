# Sourced by the CIFAR-10 benchmark scripts: one resumable, timed step, so a script can be rerun after an interruption.
# step DIR NAME DONE CMD...: run CMD with its output in DIR/logs/NAME.log and its wall time appended to
# DIR/logs/wall.txt, unless DIR/NAME/DONE exists from an earlier run
step() {
  local dir=$1 name=$2 done=$3; shift 3
  [ -e "$dir/$name/$done" ] && { echo "$name: done before, skipped"; return; }
  mkdir -p "$dir/logs"
  /usr/bin/time -f "$name: %e s wall" -a -o "$dir/logs/wall.txt" "$@" > "$dir/logs/$name.log" 2>&1
}
