#!/usr/bin/env bash
# usage: measure2.sh TAG OUT.tsv "SEED:MODE ..." FLAGS...   (MODE: compiled or eager)
# One run at a time: the plain command; wall and CPU time of the whole process; an empty Inductor cache.
set -u
tag=$1; out=$2; list=$3; shift 3
cd /work/wt20
for item in $list; do
    seed=${item%%:*}; mode=${item##*:}
    extra=(); [ "$mode" = eager ] && extra=(--no-compile)
    cache=$(mktemp -d /tmp/ll20/inductor.XXXXXX)
    runs=/tmp/ll20/runs_$tag
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(date +%s.%N)
    TORCHINDUCTOR_CACHE_DIR=$cache /usr/bin/time -f "%U %S" -o /tmp/ll20/cpu_${tag}_${mode}_$seed.txt \
        .venv/bin/python ppo_discrete.py "$@" "${extra[@]}" --seed "$seed" \
        --runs-dir "$runs" --exp-name "${tag}_${mode}_s$seed" --print-every 0 > /tmp/ll20/log_${tag}_${mode}_$seed.txt 2>&1
    code=$?
    t1=$(date +%s.%N)
    load2=$(cut -d' ' -f1 /proc/loadavg)
    rm -rf "$cache"
    ev=$(ls -d "$runs"/*"${tag}_${mode}_s$seed"__*/evaluation.json 2>/dev/null | tail -1)
    python3 - "$ev" "$tag" "$mode" "$seed" "$t0" "$t1" "$load" "$load2" "$code" /tmp/ll20/cpu_${tag}_${mode}_$seed.txt >> "$out" <<'PY'
import json, sys
ev, tag, mode, seed, t0, t1, load, load2, code, cpu = sys.argv[1:]
e = json.load(open(ev)) if ev else {"mean": float("nan"), "std": float("nan")}
u, s = map(float, open(cpu).read().split()[-2:])
print(f"{tag}\t{mode}\t{seed}\t{e['mean']:.1f}\t{e['std']:.1f}\t{e['mean']-e['std']:.1f}\t{float(t1)-float(t0):.1f}\t{u+s:.1f}\t{load}-{load2}\t{code}")
PY
    tail -1 "$out"
done
