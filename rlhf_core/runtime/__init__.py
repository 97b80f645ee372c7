"""Running a pipeline: the pipeline itself (:mod:`.pipeline`), what a stage may ask the host for
(:mod:`.context`), the run directory (:mod:`.run_dir`), ``--resume`` (:mod:`.resume`), signals
(:mod:`.signals`) and the metrics, plots and summary (:mod:`.tracking`)."""
