#!/bin/bash
# Runs issue #16's cases against a code tree, one line per case into OUT/table.tsv (docs/reliability.md):
#   bash experiments/reliability_cases.sh <main checkout> runs/before/main   # "before"
#   bash experiments/reliability_cases.sh $PWD runs/before/after        # "after"
CODE=$(realpath $1); OUT=$(realpath -m $2); mkdir -p $OUT
export PYTHONPATH=$CODE TYR_THREADS=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P=${PYTHON:-$(realpath .venv/bin/python)}  # the venv of the checkout this is run from
T=$OUT/files; mkdir -p $T/no_weights $T/no_tok
printf '{"text": "a"}\nnot json\n' > $T/bad_line.jsonl; printf '{"body": "a"}\n' > $T/no_text.jsonl
echo '{}' > $T/no_weights/config.json; echo '{}' > $T/no_weights/tokenizer.json
echo '{}' > $T/no_tok/config.json; head -c 16 /dev/zero > $T/no_tok/model.safetensors
BASE="model=tiny-llama eval=smoke eval.tasks=[] data.calibration.num_sequences=8 data.calibration.seq_len=64 data.gradient.num_sequences=4 data.gradient.seq_len=64 data.search.num_sequences=8 data.search.seq_len=64 search.min_channels=8 search.generations=2 search.offspring=4 search.stages=[[64,2],[256,1]] search.surrogate_check=4 compare=[] export=false"
n=0
run() {  # name, module, args...
  name=$1; mod=$2; shift 2; n=$((n+1)); d=$OUT/case$n
  t0=$(date +%s.%N)
  ( cd $CODE && $P -m $mod "$@" > $OUT/case$n.out 2> $OUT/case$n.err ); rc=$?
  t=$(echo "$(date +%s.%N) - $t0" | bc)
  tb=$(grep -c Traceback $OUT/case$n.out $OUT/case$n.err | awk -F: '{s+=$2} END {print s}')
  last=$(grep -v '^\s*$' $OUT/case$n.err | grep -v "HYDRA_FULL_ERROR" | tail -1 | cut -c1-160)
  made=$( [ -e $d ] && echo dir || echo nodir)
  printf "%s\t%s\trc=%s\ttraceback=%s\t%s\t%.0fs\t%s\n" "$n" "$name" "$rc" "$tb" "$made" "$t" "$last" >> $OUT/table.tsv
}
P1="tyr.recipes.pipeline"
run "target_sparsity=1.0" $P1 $BASE target_sparsity=1.0 hydra.run.dir=$OUT/case1
run "target_sparsity=1.5" $P1 $BASE target_sparsity=1.5 hydra.run.dir=$OUT/case2
run "search.n_levels=1" $P1 $BASE search.n_levels=1 hydra.run.dir=$OUT/case3
run "search.n_levels=4" $P1 $BASE search.n_levels=4 hydra.run.dir=$OUT/case4
run "search.generations=0" $P1 $BASE search.generations=0 hydra.run.dir=$OUT/case5
run "compare=[dense,foo]" $P1 $BASE "compare=[dense,foo]" hydra.run.dir=$OUT/case6
run "search.offspring=0" $P1 $BASE search.offspring=0 hydra.run.dir=$OUT/case7
run "search.holdout=1.0" $P1 $BASE search.holdout=1.0 hydra.run.dir=$OUT/case8
run "search.intervals=[]" $P1 $BASE "search.intervals=[]" hydra.run.dir=$OUT/case9
run "stages > search tokens" $P1 $BASE "search.stages=[[1000,2],[100000,1]]" hydra.run.dir=$OUT/case10
run "data: missing file" $P1 $BASE data.calibration.source=jsonl:$T/missing.jsonl hydra.run.dir=$OUT/case11
run "data: non-JSON line" $P1 $BASE data.calibration.source=jsonl:$T/bad_line.jsonl hydra.run.dir=$OUT/case12
run "data: no text key" $P1 $BASE data.calibration.source=jsonl:$T/no_text.jsonl hydra.run.dir=$OUT/case13
run "data: unknown source" $P1 $BASE data.calibration.source=wikitext3 hydra.run.dir=$OUT/case14
run "data: seq_len=0" $P1 $BASE data.calibration.seq_len=0 hydra.run.dir=$OUT/case15
run "folder without weights" $P1 $BASE model=hf_folder model.source.path=$T/no_weights hydra.run.dir=$OUT/case16
run "folder without tokenizer" $P1 $BASE model=hf_folder model.source.path=$T/no_tok hydra.run.dir=$OUT/case17
run "model=hf_folder, no path" $P1 $BASE model=hf_folder hydra.run.dir=$OUT/case18
run "export: wrong run= path" tyr.recipes.export run=$OUT/case19
run "plan model=hf_folder" tyr.recipes.plan model=hf_folder hydra.run.dir=$OUT/case20
run "build: num_sequences=0" tyr.recipes.build model=tiny-llama data.calibration.num_sequences=0 data.calibration.seq_len=64 hydra.run.dir=$OUT/case21
run "build: corrected rerun" tyr.recipes.build model=tiny-llama data.calibration.num_sequences=8 data.calibration.seq_len=64 data.gradient.num_sequences=4 data.gradient.seq_len=64 supernet.min_channels=8 hydra.run.dir=$OUT/case21
# reruns on one finished run
R=$OUT/ref
run "reference run" $P1 $BASE hydra.run.dir=$R
cp $R/.hydra/config.yaml $OUT/ref_config.yaml; cp $R/results_searched.json $OUT/ref_results.json
run "rerun search.generations=3" $P1 $BASE search.generations=3 hydra.run.dir=$R
cmp -s $R/.hydra/config.yaml $OUT/ref_config.yaml && echo "   config.yaml unchanged" >> $OUT/table.tsv || echo "   config.yaml REWRITTEN" >> $OUT/table.tsv
cmp -s $R/results_searched.json $OUT/ref_results.json && echo "   results_searched.json unchanged" >> $OUT/table.tsv || echo "   results_searched.json changed" >> $OUT/table.tsv
run "rerun data.search.seed=7" $P1 $BASE data.search.seed=7 hydra.run.dir=$R
cp $OUT/ref_config.yaml $R/.hydra/config.yaml
python3 - $R/teacher.safetensors <<'PY'
import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[-5]^=0xFF; open(p,'wb').write(bytes(b))
PY
run "corrupt teacher cache" $P1 $BASE hydra.run.dir=$R
M=$(ls -d $R/iter1/supernet)
echo "{not json" > $M/manifest.json
run "invalid manifest.json" $P1 $BASE hydra.run.dir=$R
