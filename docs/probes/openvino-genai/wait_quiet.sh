#!/bin/bash
# wait until the 2 CPUs are >=90% idle for 3 consecutive 5-second windows (max ~$1 s)
max=${1:-900}; ok=0; t0=$(date +%s)
idle() { read -r _ u n s i w x y z _ < /proc/stat; echo "$((u+n+s+i+w+x+y+z)) $((i+w))"; }
while [ $(( $(date +%s) - t0 )) -lt $max ]; do
  a=($(idle)); sleep 5; b=($(idle))
  pct=$(( 100 * (b[1]-a[1]) / (b[0]-a[0]) ))
  if [ $pct -ge 90 ]; then ok=$((ok+1)); else ok=0; fi
  echo "$(date +%T) idle ${pct}% ok=$ok"
  [ $ok -ge 3 ] && exit 0
done
exit 1
