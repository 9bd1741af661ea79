#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# mxd train --models, --latents and the baseline's recipe flags (issue 23):
#   - --models mxd,topk --latents M is the default run (--expansion M / d_in), bit for bit;
#   - a model trained alone (--models topk) equals the same model trained beside the MxD;
#   - --latents matches each pair exactly: MxD = TopK, MxD+skip = skip transcoder;
#   - a baseline alone resumes (--resume) to the bytes of an uninterrupted run;
#   - the recipe flags run and change the baseline only (the MxD stays bit for bit); SAELens's
#     recipe is the default, with uniform init where d_in != d_out, and its AuxK form with
#     weight 1 and a window of 1001 batches;
#   - bad values end in exit status 1 with one stderr line "mxd: error: ..." naming them.
#
#   train_models.sh MXD WORK_DIR
set -u
mxd=$1
work=$2
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
small=(--d-in 16 --d-hidden 32 --d-out 16 --teacher-hidden 32 --eval-rows 256 --batch 32 --k 4
       --threads 1 --log-every 5 --progress-every 0)
fail=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fail=1; }
run() {  # run DIR ARGS...
  local dir=$1
  shift
  "$mxd" train "${small[@]}" --out "$dir" "$@" >"$dir.out" 2>"$dir.err" || { bad "mxd train $*: $(cat "$dir.err")"; return 1; }
}
params() {  # params DIR NAME: the parameter count metrics.json gives model NAME
  python3 - "$1/metrics.json" "$2" <<'PY'
import json, sys
print(next(m["params"] for m in json.load(open(sys.argv[1]))["models"] if m["name"] == sys.argv[2]))
PY
}
same() {  # same FILE FILE WHAT
  if cmp -s "$1" "$2"; then ok "$3"; else bad "$3 ($1 and $2 differ)"; fi
}

run default --steps 10 && run pair --steps 10 --models mxd,topk --latents 512 &&
  same default/mxd.safetensors pair/mxd.safetensors "--models mxd,topk --latents 512: the default run's MxD" &&
  same default/topk_transcoder.safetensors pair/topk_transcoder.safetensors "--models mxd,topk --latents 512: its transcoder"
run alone --steps 10 --models topk --latents 512 &&
  same pair/topk_transcoder.safetensors alone/topk_transcoder.safetensors "--models topk: the transcoder trained alone" &&
  { [ ! -e alone/mxd.safetensors ] && ok "--models topk: no MxD written" || bad "--models topk wrote an MxD"; }
run mxdonly --steps 10 --models mxd --latents 512 &&
  same pair/mxd.safetensors mxdonly/mxd.safetensors "--models mxd: the MxD trained alone"

# Exact matching: for 16 -> 32 -> 16 an MxD of N experts equals a transcoder of N + 32 latents.
run exact --steps 2 --models mxd,topk --latents 100 &&
  { [ "$(params exact mxd)" = "$(params exact topk_transcoder)" ] &&
    ok "--latents 100: MxD $(params exact mxd) = TopK $(params exact topk_transcoder) parameters" ||
    bad "--latents 100: MxD $(params exact mxd) != TopK $(params exact topk_transcoder)"; }
run exact_skip --steps 2 --models mxd,skip --skip --latents 100 &&
  { [ "$(params exact_skip mxd)" = "$(params exact_skip skip_transcoder)" ] &&
    ok "--skip --latents 100: MxD+skip $(params exact_skip mxd) = skip transcoder $(params exact_skip skip_transcoder)" ||
    bad "--skip --latents 100: MxD+skip $(params exact_skip mxd) != skip transcoder $(params exact_skip skip_transcoder)"; }

# A baseline alone, resumed: the bytes of the uninterrupted run.
run half --steps 5 --checkpoint-every 0 --models skip --latents 64 &&
  { "$mxd" train "${small[@]}" --steps 10 --out half --resume half --models skip >half2.out 2>half2.err ||
    bad "--models skip --resume: $(cat half2.err)"; } &&
  run whole --steps 10 --models skip --latents 64 &&
  same half/skip_transcoder.safetensors whole/skip_transcoder.safetensors "--models skip: resumed = uninterrupted"

# The recipe flags change the baseline only; SAELens's recipe is the default.
run recipe --steps 10 --models mxd,topk --latents 512 --tc-recipe saelens &&
  same pair/topk_transcoder.safetensors recipe/topk_transcoder.safetensors "--tc-recipe saelens: the default" &&
  run authors --steps 10 --models mxd,topk --latents 512 --tc-recipe authors &&
  same pair/mxd.safetensors authors/mxd.safetensors "--tc-recipe authors: the MxD unchanged" &&
  { ! cmp -s pair/topk_transcoder.safetensors authors/topk_transcoder.safetensors &&
    ok "--tc-recipe authors: the transcoder trained otherwise" || bad "--tc-recipe authors changed nothing"; }
# d_in != d_out: the default cannot tie the encoder to the decoder, so it starts uniform.
run untied --steps 3 --models topk --latents 64 --d-out 8 &&
  run untied_explicit --steps 3 --models topk --latents 64 --d-out 8 --tc-recipe saelens --tc-init uniform &&
  same untied/topk_transcoder.safetensors untied_explicit/topk_transcoder.safetensors "d_in != d_out: the default starts uniform"
# SAELens's ranking by decoder norm is saved with the model (the default's file says so, the
# authors' recipe's does not), and a resume may not contradict it.
has_rank() {  # has_rank FILE: 1 when its metadata sets rank_by_decoder_norm
  python3 - "$1" <<'PY'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    print(json.loads(f.read(n)).get("__metadata__", {}).get("rank_by_decoder_norm", "0"))
PY
}
[ "$(has_rank pair/topk_transcoder.safetensors)" = 1 ] && [ "$(has_rank authors/topk_transcoder.safetensors)" = 0 ] &&
  ok "the default baseline's file says rank_by_decoder_norm, the authors' recipe's does not" ||
  bad "rank_by_decoder_norm in the files: default $(has_rank pair/topk_transcoder.safetensors), authors $(has_rank authors/topk_transcoder.safetensors)"
# SAELens's AuxK form comes with its weight and window; metrics.json says which ran.
python3 - pair/metrics.json authors/metrics.json <<'PY' &&
import json, sys
tc = lambda f: next(m for m in json.load(open(f))["models"] if m["name"] == "topk_transcoder")
d, a = tc(sys.argv[1]), tc(sys.argv[2])
want = {"aux_k": 8, "aux_form": "saelens", "aux_coef": 1.0, "dead_window": 1001 * 32}
assert all(d.get(k) == v for k, v in want.items()), d
assert "aux_k" not in a, a  # the authors' recipe: AuxK as the MxD, off here
PY
  ok "the default baseline's AuxK: SAELens's form, weight 1, 1001 batches" || bad "the default baseline's AuxK settings"
for flags in "--tc-loss mse" "--tc-loss sse" "--tc-rank-by-dec-norm off" "--tc-init tied" "--tc-clip-grad 1" "--tc-warmup 0" "--tc-aux-k 8" \
             "--tc-norm-dec off" "--tc-recipe saelens --tc-aux-k 0" "--tc-recipe authors --tc-init tied" \
             "--tc-aux-form normalized" "--tc-recipe authors --tc-aux-k 8 --tc-aux-form saelens"; do
  d=knob_$(tr -c 'a-z0-9' _ <<<"$flags")
  # shellcheck disable=SC2086
  run "$d" --steps 3 --models topk --latents 64 $flags && ok "--models topk $flags runs"
done

refuse() {  # refuse WHAT ARGS...: exit 1, one stderr line "mxd: error: ...WHAT..."
  local what=$1 err rc
  shift
  err=$(timeout 20 "$mxd" train "${small[@]}" --steps 1 --out refused "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" = 1 ] && [ "$(wc -l <<<"$err")" = 1 ] && [[ "$err" == "mxd: error: "*"$what"* ]]; then
    ok "$*: $err"
  else
    bad "$*: exit status $rc, stderr: $err"
  fi
}
refuse "'foo' is not mxd, topk or skip" --models mxd,foo
refuse "topk and skip in one run" --models topk,skip
refuse "'mxd' is given twice" --models mxd,mxd
refuse "--models = 'mxd,'" --models mxd,
refuse "--models = ''" --models ""
refuse "--models mxd and --baseline topk" --models mxd --baseline topk
refuse "--latents 100 and --expansion 2" --latents 100 --expansion 2
refuse "--latents = 0 is out of range" --latents 0
refuse "--latents 3: " --latents 3
refuse "--k = 4 exceeds the transcoder's 2 latents" --models topk --latents 2
refuse "--tc-loss = 'l1'" --tc-loss l1
refuse "--tc-init = 'xavier'" --tc-init xavier
refuse "--tc-clip-grad = -1" --tc-clip-grad -1
refuse "--tc-norm-dec = 'maybe'" --tc-norm-dec maybe
refuse "--tc-rank-by-dec-norm = 'yes'" --tc-rank-by-dec-norm yes
refuse "--tc-rank-by-dec-norm off conflicts with the checkpoint resumed" --steps 10 --models skip --resume half --tc-rank-by-dec-norm off
refuse "--tc-recipe = 'sae'" --tc-recipe sae
refuse "--tc-aux-form = 'openai'" --tc-aux-form openai
refuse "--tc-aux-form saelens needs the baseline's AuxK on" --tc-recipe authors --tc-aux-form saelens
refuse "--tc-warmup = -1 is out of range" --tc-warmup -1
refuse "but none trains" --models mxd --tc-loss mse
refuse "--tc-init tied needs d_in == d_out" --d-out 8 --tc-init tied
refuse "--tc-init tied needs d_in == d_out" --d-out 8 --tc-recipe saelens
refuse "names no mxd.safetensors (use the --models it was trained with)" --steps 10 --resume half
[ "$fail" = 0 ] && echo "every --models, --latents and --tc-* case behaved as documented"
exit "$fail"
