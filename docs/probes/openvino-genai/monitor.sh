#!/bin/bash
# log the 3 busiest processes every 5 s (to spot other work on the shared cores)
while true; do
  echo "$(date +%T) $(top -bn1 -w 200 | sed -n '8,10p' | awk '{print $9"%",$12,$13}' | tr '\n' ' ')"
  sleep 5
done
