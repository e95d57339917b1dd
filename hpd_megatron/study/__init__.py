"""The studies: the demo's (one teacher, five students) and `make study`'s tuned protocol.

experiment.py  the demo's study (``python -m hpd_megatron.study``): teacher data, the
               students' shared start, every method's training, evaluation, KL to the teacher
report.py      the tables and plots from the ``study.json`` either writes
protocol.py    `make study` (``python -m hpd_megatron.study.protocol``): the entropy-rich
               teacher, two data regimes, lr tuned on validation, seeds, on-policy baselines
select.py      the protocol's lr choice and its aggregation over seeds
bshare.py      HPD's B term's share of the gradient at the logits
"""
