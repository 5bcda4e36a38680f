#!/usr/bin/env bash
# On the GPU machine, after bench/gpu.sh has set up /tmp/site: bash bench/probes/import_after_restore.sh
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD/src WARMSTART_CRIU=$PWD/.deps/criu-bundle/criu LD_LIBRARY_PATH=$PWD/.deps/criu-bundle/lib
export WARMSTART_HOME=/tmp/probe-home
M=$(du -s /var/tmp/warmstart-bench/cache/models/reference-*-bfloat16 | sort -n | head -1 | cut -f2)
rm -rf /tmp/probe-art "$WARMSTART_HOME" /tmp/p.sock
(setsid python3 -m warmstart weights serve --device cuda:0 --socket /tmp/p.sock > /tmp/p-svc.log 2>&1 &)
for i in $(seq 50); do [ -S /tmp/p.sock ] && break; sleep 0.2; done
python3 -m warmstart run --name probe --wait --timeout 120 -- python3 bench/probes/import_after_restore.py /tmp/p.sock "$M"
python3 -m warmstart checkpoint probe -o /tmp/probe-art --leave-running 2>&1 | tail -1
echo "-- resumed in place (same process):"; grep probe: "$WARMSTART_HOME/workers/probe/worker.log"
python3 -m warmstart restore /tmp/probe-art --name probe-r 2>&1 | tail -2
sleep 2; echo "-- restored replica (new pid namespace):"; grep probe: "$WARMSTART_HOME/workers/probe-r/worker.log"
python3 -m warmstart stop probe; python3 -m warmstart stop probe-r
