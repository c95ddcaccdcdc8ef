#!/usr/bin/env bash
# Numbers stay put: trains 3 small configs with two moe binaries (1 and 2 threads each),
# and compares metrics.jsonl without its timing fields, `moe eval` and `moe generate` text;
# also that the new binary gives the same metrics on 1 and 2 threads. Exits 1 on any
# difference. Configs: makemoe.json (40 steps); tiny with rmsnorm, rope, GQA, swiglu, a shared
# expert, z-loss, the loss-free bias, cosine and clipping; tiny with block 64 and capacity 1.25.
# Usage: scripts/compare_binaries.sh OLD_MOE NEW_MOE OUTDIR   (about a minute)
set -uo pipefail
[ $# -eq 3 ] || { echo "usage: $0 OLD_MOE NEW_MOE OUTDIR" >&2; exit 2; }
OLD=$(realpath "$1"); NEW=$(realpath "$2"); mkdir -p "$3"; OUT=$(realpath "$3")
cd "$(dirname "$0")/.."
bash data/get_data.sh > /dev/null
mk() { python3 - "$@" <<'PY'
import json,sys
base,out,extra=sys.argv[1],sys.argv[2],sys.argv[3]
c=json.load(open(base))
for k,v in json.loads(extra).items():
    c.setdefault(k,{}).update(v)
json.dump(c,open(out,'w'))
PY
}
mk configs/makemoe.json $OUT/a.json '{"training":{"max_steps":40},"logging":{"eval_interval":20,"eval_iters":5,"log_interval":10,"checkpoint_interval":0}}'
mk configs/tiny.json $OUT/b.json '{"model":{"norm":"rmsnorm","position":"rope","n_kv_head":2,"dropout":0.1,"expert_ffn":"swiglu","shared_experts":1},"router":{"gating":"topk_softmax","z_loss_coef":0.001,"bias_update_rate":0.001},"optimizer":{"schedule":"cosine","warmup_steps":5,"grad_clip":1.0},"training":{"max_steps":40},"logging":{"eval_interval":20,"eval_iters":5,"log_interval":10}}'
mk configs/tiny.json $OUT/c.json '{"model":{"block_size":64,"dropout":0.1},"router":{"capacity_factor":1.25},"training":{"max_steps":30,"batch_size":8},"logging":{"eval_interval":15,"eval_iters":5,"log_interval":5}}'
strip() { python3 -c "
import json,sys
for l in open(sys.argv[1]):
    d=json.loads(l)
    for k in list(d):
        if any(t in k for t in ('time','ms','per_s','elapsed','wall','tok_s','sec')): d.pop(k)
    print(json.dumps(d,sort_keys=True))" $1; }
rc=0
for cfg in a b c; do for th in 1 2; do for who in old new; do
  BIN=$OLD; [ $who = new ] && BIN=$NEW
  d=$OUT/$cfg-$th-$who; rm -rf $d
  OMP_NUM_THREADS=$th $BIN train --config $OUT/$cfg.json --out $d --overwrite > $d.log 2>&1 || echo "train failed $d"
  strip $d/metrics.jsonl > $d.m
  ck=$d/last.safetensors; [ -f $ck ] || ck=$(ls $d/*.safetensors | head -1)
  OMP_NUM_THREADS=$th $BIN eval --checkpoint $ck 2>/dev/null | grep -v -i "time\|per_s\|seconds" > $d.eval
  OMP_NUM_THREADS=$th $BIN generate --checkpoint $ck --max-new-tokens 300 --seed 3 > $d.gen 2>/dev/null
done
for f in m eval gen; do
  if cmp -s $OUT/$cfg-$th-old.$f $OUT/$cfg-$th-new.$f; then echo "$cfg threads=$th $f identical"; else echo "$cfg threads=$th $f DIFFER"; rc=1; fi
done; done
cmp -s $OUT/$cfg-1-new.m $OUT/$cfg-2-new.m && echo "$cfg new 1==2 threads" || { echo "$cfg new 1!=2 threads"; rc=1; }
done
exit $rc
