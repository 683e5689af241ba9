"""Reproduction of the toy experiment of Chen et al. (2018), Section 4 and Figure 2.

Run ``python -m gradnorm_func.repro`` (quick) or ``python -m gradnorm_func.repro --full``.
"""
