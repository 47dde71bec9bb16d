# The twelve regions of the research-cpu run, sourced by run.sh, data.sh, evaluate.sh and ablation.sh:
# each region's bundled extract (data/samples/), the ten trained on, and all twelve (the last two held out).
declare -A SRC=([helsinki]=helsinki [kotka]=kotka [isle-of-wight]=isle-of-wight-2020-04 [malta]=malta-2016-11
  [andorra]=andorra-2021-10 [rutland]=rutland-2022-07 [monaco]=monaco-2016-03 [london-centre]=london-centre-2020
  [munchen-centre]=munchen-centre-2020 [moscow-centre]=moscow-centre-2020 [liechtenstein]=liechtenstein-2022-12
  [porto-centre]=porto-centre-2020)
TRAIN=(helsinki kotka isle-of-wight malta andorra rutland monaco london-centre munchen-centre moscow-centre)
ALL=("${TRAIN[@]}" liechtenstein porto-centre)
