"""The paper end to end at a chosen scale: train, evaluate, sample, score, plot, report.

  python -m jeat_jax.reproduce --scale=cpu --workdir=runs/repro_cpu \\
      --data_path=../shared/data/cifar10-jpeg-standin.npz

Every run of `runs.RUNS` (the recipes of the paper, noise injection at three
strengths) trains in WORKDIR/<run> with `configs/<recipe>.py:<scale>`, then is
evaluated (`--mode=evaluate`), sampled and scored (`--mode=sample`, `fid`) and
analysed (`--mode=analyze`). A stage whose output exists is skipped, so an
interrupted reproduction resumes where it stopped and a recipe already trained
is not trained again. Finally WORKDIR/REPORT.md gets the paper's Table 1 and
Table 2 layouts and the IS/FID row of Fig. 6 filled with this run's numbers,
the paper's beside them, the figures inline and a verdict per claim, and
names the dataset the runs recorded.

On several processes (`--distributed`, config.distributed.*: the same command
on every process, one shared --workdir) every process runs every stage, each
feeding its share of the data; what is done is decided by process 0's view of
the workdir, and process 0 alone writes the reports, timings and figures.

The package: `fair` (the fair comparison's protocol: recipes, seeds, points, claims),
`runs` (the runs, what each scale trains and measures, their configs), `stages` (the stages
of one run, and runs side by side in child processes), `results` (what the runs wrote, as
both reports read it), `paper_report` (REPORT.md of the paper's scales), `fair_report`
(REPORT.md of --scale=cpu-fair), `cli` (the flags and `main`; `__main__` runs it).
"""
from jeat_jax import logs

logs.quiet_tensorflow()  # before any submodule imports TensorFlow
