"""The paper's analyses as tools (``dscl analyze``), each writing PNG + JSON under ``RUN/analysis/``.

* :mod:`dscl.analysis.gradient`  — gradient-ratio diagnostic (paper Fig. 2, METHOD.md A.5-A.6, G 5-6)
* :mod:`dscl.analysis.retrieval` — image retrieval (Fig. 1) and patch retrieval (Fig. 4)
* :mod:`dscl.analysis.common`    — opening a finished run, choosing classes, atomic output files
"""
