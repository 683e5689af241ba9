"""Reproduction and evidence: the toy experiment of Chen et al. (2018), Section 4 and Figure 2,
and a multi-task experiment on scikit-learn's bundled digits against uncertainty weighting and
DWA.

Run ``python -m gradnorm_func.repro --experiment {toy,digits,all}`` (quick) or add ``--full``;
see ``docs/reproduction.md``.
"""
