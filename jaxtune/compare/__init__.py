"""`python -m jaxtune.compare`: LoRA vs full fine-tuning on the user's task, measured and plotted.

One config (configs/compare.py: the train config plus a `compare` group of arms) -> each arm an
ordinary jaxtune.train run in DIR/arms/NAME, evaluated with jaxtune.evaluate's pieces -> DIR/report.md,
report.html, report.json. Modules: `arms` (config -> arm configs), `run` (jobs, skip/resume),
`worker` (one job per process), `spectra` (weight-change singular values, pure), `figures` (rows of
figures, Pareto front), `verdict` (rule-based sentences), `report` (json/md/html), `plots` (PNGs).
"""
