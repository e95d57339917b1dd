"""The demo's study: one teacher, five students, one table and plot.

experiment.py  the study itself (``python -m hpd_megatron.study``): teacher data, the
               students' shared start, every method's training, evaluation, KL to the teacher
report.py      the table and plot from the ``study.json`` the experiment writes
"""
