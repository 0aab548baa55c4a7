"""The lab beside the product: the synthetic CT generator, the experiment runner behind the demo, the ablation
and the learning check, the demo's small model and the short-schedule CPU trainers.

It lives in the repository and is not installed with `nnunetv2_gfscreen` (setup.cfg packages only that);
run it from a clone, e.g. `python -m gfscreen_lab.experiments.demo`. The product never imports it.
"""
